"""The numba kernels agree with the readable NumPy definitions they speed up."""

import numpy as np
import pytest

from glm_numpy.dtypes import from_float32, to_float32
from glm_numpy.kernels import dispatch
from glm_numpy.kernels.widen import widen_bf16, widen_fp16
from glm_numpy.layers.linear import linear, linear_reference
from glm_numpy.quantize import quantize

O, I = 72, 256  # small, but the int4 groups (32, 64) and the per-row case all fit

STORAGES = {
    "fp32": lambda w: w,
    "fp16": lambda w: w.astype(np.float16),
    "bf16": lambda w: from_float32(w, "bfloat16"),
    "int8 per-row": lambda w: quantize(w, 8),
    "int8 groups of 64": lambda w: quantize(w, 8, group_size=64),
    "int4 per-row": lambda w: quantize(w, 4),
    "int4 groups of 32": lambda w: quantize(w, 4, group_size=32),
    "int4 groups of 64, float32 scales": lambda w: quantize(w, 4, 64, scale_dtype="float32"),
}


def random_weight(rows=O, columns=I, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same product up to float32 summation order: relative to the output's magnitude."""
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


@pytest.fixture
def small_blocks(monkeypatch):
    """Prefill in blocks of 32 rows, so a small weight spans several blocks and a partial one."""
    monkeypatch.setattr(dispatch, "BLOCK_ROWS", 32)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("tokens", [1, 3, 17], ids=["decode", "decode-3-rows", "prefill"])
def test_linear_matches_reference(storage, tokens, small_blocks):
    w = STORAGES[storage](random_weight())
    x = np.random.default_rng(1).standard_normal((tokens, I)).astype(np.float32)
    assert_close(linear(x, w), linear_reference(x, w))


@pytest.mark.parametrize("storage", ["fp16", "bf16", "int8 groups of 64", "int4 per-row"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_non_contiguous_inputs_and_bias(storage, tokens, small_blocks):
    """x a strided view with leading batch axes, a read-only Fortran-ordered weight, a bias."""
    w = STORAGES[storage](random_weight())
    if isinstance(w, np.ndarray):
        w = np.asfortranarray(w)
        w.flags.writeable = False  # as memory-mapped checkpoints are
    wide = np.random.default_rng(2).standard_normal((2, tokens, 2 * I)).astype(np.float32)
    x = wide[..., ::2]  # [2, T, I], not contiguous
    bias = np.random.default_rng(3).standard_normal(O).astype(np.float16)
    actual = linear(x, w, bias)
    assert actual.shape == (2, tokens, O)
    assert_close(actual, linear_reference(x, w, bias))


@pytest.mark.parametrize("widen, storage", [(widen_fp16, "fp16"), (widen_bf16, "bf16")])
def test_16_bit_widening_is_exact(widen, storage):
    """Every bit pattern that is not NaN widens to exactly numpy's float32 value; NaN stays NaN."""
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    expected = to_float32(bits.view(np.float16) if storage == "fp16" else bits)  # [256, 256]
    out = np.empty((256, 256), dtype=np.float32)
    widen(bits, 0, out)
    np.testing.assert_array_equal(out, expected)  # assert_array_equal treats NaN == NaN


def test_prefill_block_start_offsets_rows():
    bits = from_float32(random_weight(), "bfloat16")
    out = np.empty((5, I), dtype=np.float32)
    widen_bf16(bits, 10, out)
    np.testing.assert_array_equal(out, to_float32(bits[10:15]))


def test_wrong_feature_count_is_a_clear_error():
    with pytest.raises(ValueError, match="x has 100 features, the weight expects 256"):
        linear(np.ones((1, 100), np.float32), random_weight().astype(np.float16))


def test_unsupported_weight_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype int32"):
        linear(np.ones((1, I), np.float32), np.ones((O, I), np.int32))
