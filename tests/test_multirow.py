"""The multi-row kernels (prompts and batched decode steps) agree with the readable math, and a
quantised model computes one function whichever way its tokens arrive."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy import ChatGLM2
from glm_numpy.checkpoint.layout import QUANTIZED_MODULES
from glm_numpy.dtypes import from_float32
from glm_numpy.kernels import dispatch, intdot, matvec, multirow
from glm_numpy.layers.linear import (
    linear,
    linear_integer_reference,
    linear_reference,
    round_activations,
)
from glm_numpy.quantize import quantize
from glm_numpy.testing import write_tiny_checkpoint

needs_vnni = pytest.mark.skipif(not intdot.HAS_AVX512_VNNI, reason="no AVX-512 VNNI")


def close(actual, expected, tolerance=2e-5):
    """Equal up to float32 summation order, relative to the output's largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def operands(data, bits_choices, column_unit, group_sizes):
    """A random x [T, I] and weight [O, I]: ragged T (not a multiple of the tile) and O (not a
    multiple of the tiles' 2 or 4 weight rows)."""
    T = data.draw(st.integers(2, 21), label="T")
    O = data.draw(st.integers(1, 19), label="O")
    I = column_unit * data.draw(st.integers(1, 6), label="I / unit")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, I)).astype(np.float32)
    x[rng.random(T) < 0.2] = 0.0  # an all-zero row: its scales are 0
    w = rng.standard_normal((O, I)).astype(np.float32)
    return x, w, data.draw(st.sampled_from(bits_choices)), data.draw(st.sampled_from(group_sizes))


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@given(data=st.data())
def test_16_bit_rows_match_the_reference(storage, data):
    """Ragged T on both sides of one group of 16 tokens (every tile shape and remainder), O
    across blocks of rows, I across blocks of packed columns."""
    T = data.draw(st.integers(2, 90), label="T")
    O = data.draw(st.integers(1, 200), label="O")
    I = data.draw(st.sampled_from([1, 8, 40, 255, 256, 300, 520]), label="I")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    x = rng.standard_normal((T, I)).astype(np.float32)
    w = rng.standard_normal((O, I)).astype(np.float32)
    w16 = w.astype(np.float16) if storage == "float16" else from_float32(w, "bfloat16")
    close(dispatch.project(x, w16), linear_reference(x, w16))


def test_round_activations_matches_the_decode_kernel():
    x = np.random.default_rng(3).standard_normal((3, 128)).astype(np.float32)
    x[1] = 0.0
    x_q, scale = np.empty((3, 128), np.int8), np.empty((3, 2), np.float32)
    matvec.quantize_activations(x, 64, x_q, scale)
    expected_q, expected_scale = round_activations(x, 64)
    np.testing.assert_array_equal(x_q, expected_q)
    np.testing.assert_array_equal(scale, expected_scale)


@needs_vnni
@given(data=st.data())
def test_integer_rows_match_the_readable_scheme_and_decode(data):
    """Every group length (odd numbers of 32-byte blocks too, groups of 32 to 256 columns),
    per-row and group-wise scales: equal to the readable definition, and bit-equal to the
    decode kernel row by row."""
    x, w, bits, blocks_per_group = operands(data, [4, 8], 64, [None, 1, 2, 3, 4])
    group = None if blocks_per_group is None else blocks_per_group * (64 if bits == 4 else 32)
    if group is not None and x.shape[1] % group:
        group = None
    qw = quantize(w, bits, group)
    close(linear(x, qw), linear_integer_reference(x, qw), 1e-5)
    one_by_one = np.concatenate([linear(row[None], qw) for row in x])
    np.testing.assert_array_equal(linear(x, qw), one_by_one)


@needs_vnni
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 128), (8, 256)])
def test_integer_rows_over_several_token_blocks(bits, group_size):
    """More tokens than one block of activations (multirow.TOKEN_BLOCK_BYTES): every block,
    the last one partial, agrees with decode bit for bit."""
    I = 4096
    T = multirow.TOKEN_BLOCK_BYTES // I + 9
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, I)).astype(np.float32)
    qw = quantize(rng.standard_normal((7, I)).astype(np.float32), bits, group_size)
    at_once = linear(x, qw)
    close(at_once, linear_integer_reference(x, qw), 1e-5)
    np.testing.assert_array_equal(at_once, np.concatenate([linear(row[None], qw) for row in x]))


@needs_vnni
@pytest.mark.parametrize("bits, group_size", [(8, None), (4, None), (4, 64)])
def test_quantised_model_prompt_at_once_equals_token_by_token(tmp_path, bits, group_size):
    """The last token's logits of a prompt read at once equal those of the same prompt fed one
    token at a time through the cache (to float rounding: attention sums in another order)."""
    source = ChatGLM2.from_pretrained(
        write_tiny_checkpoint(tmp_path, dtype="float16", ffn_hidden_size=128)
    )
    weights = dict(source.weights)
    for name in [n for n in weights if n.endswith(tuple(f"{m}.weight" for m in QUANTIZED_MODULES))]:
        qw = quantize(weights[name], bits, group_size)
        weights[name], weights[f"{name}_scale"] = qw.q, qw.scale
    model = ChatGLM2(dataclasses.replace(source.config, quantization_bit=bits), weights)
    ids = np.random.default_rng(0).integers(0, model.config.padded_vocab_size, 11)
    at_once = model.forward(ids, last_only=True)
    cache = model.new_cache()
    for token in ids:
        one_by_one = model.forward(np.array([token]), cache=cache, last_only=True)
    close(at_once, one_by_one, 1e-5)


def test_padded_rows_are_whole_tiles():
    assert [multirow.padded_rows(t) for t in (1, 4, 5, 9)] == [4, 4, 8, 12]
