"""The numba kernels agree with the readable NumPy definitions they speed up."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

from glm_numpy import ChatGLM2
from glm_numpy.dtypes import from_float32, to_float32
from glm_numpy.kernels import dispatch, intdot, matvec, tiles
from glm_numpy.kernels.attention import (
    attention_context,
    fused_attention_serial,
)
from glm_numpy.kernels.matvec import quantize_activations
from glm_numpy.kernels.norm import fused_rms_norm
from glm_numpy.kernels.widen import transpose
from glm_numpy.layers.attention import attention
from glm_numpy.layers.linear import linear, linear_reference
from glm_numpy.layers.rms_norm import rms_norm
from glm_numpy.quantize import quantize
from glm_numpy.testing import write_tiny_checkpoint

O, I = 72, 256  # small, but every group size below and the per-row case fit

# Quantised weights with float16 scales and whole 32-byte blocks per group take the integer
# kernels (AVX2 or AVX-512 VNNI), which round x to int8 too: they agree to about 1 % of the
# output's size.
EXACT, X_ROUNDED = 2e-5, 1.5e-2
STORAGES = {
    "fp32": (lambda w: w, EXACT),
    "fp16": (lambda w: w.astype(np.float16), EXACT),
    "bf16": (lambda w: from_float32(w, "bfloat16"), EXACT),
    "int8 per-row": (lambda w: quantize(w, 8), X_ROUNDED),
    "int8 groups of 64": (lambda w: quantize(w, 8, group_size=64), X_ROUNDED),
    "int8 groups of 32 (one block each)": (lambda w: quantize(w, 8, group_size=32), X_ROUNDED),
    "int8 groups of 16 (float kernel)": (lambda w: quantize(w, 8, group_size=16), EXACT),
    "int4 per-row": (lambda w: quantize(w, 4), X_ROUNDED),
    "int4 groups of 128": (lambda w: quantize(w, 4, group_size=128), X_ROUNDED),
    "int4 groups of 64 (one block each)": (lambda w: quantize(w, 4, group_size=64), X_ROUNDED),
    "int4 groups of 32 (float kernel)": (lambda w: quantize(w, 4, group_size=32), EXACT),
    "int4 float32 scales (float kernel)": (lambda w: quantize(w, 4, scale_dtype="float32"), EXACT),
}


def random_weight(rows=O, columns=I, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Same product up to float32 summation order (and x's rounding where the kernel rounds
    it): the error is measured relative to the output's largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * np.abs(expected).max())


@pytest.fixture
def small_blocks(monkeypatch):
    """Prefill in blocks of 32 rows, so a small weight spans several blocks and a partial one."""
    monkeypatch.setattr(dispatch, "BLOCK_ROWS", 32)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("tokens", [1, 3, 17], ids=["decode", "3-rows", "prefill"])
def test_linear_matches_reference(storage, tokens, small_blocks):
    make, tolerance = STORAGES[storage]
    w = make(random_weight())
    x = np.random.default_rng(1).standard_normal((tokens, I)).astype(np.float32)
    # Integer kernels round x at every length (one function for prompts and decode steps).
    assert_close(linear(x, w), linear_reference(x, w), tolerance)


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
@pytest.mark.parametrize("rows", [72, 73], ids=["even-rows", "odd-rows"])
def test_16_bit_decode_in_row_pairs_matches_reference(storage, rows, monkeypatch):
    """Long rows are read two at a time (PAIRS_FROM_COLUMNS); here every row is, and an odd
    count leaves a last row alone."""
    monkeypatch.setattr(dispatch, "PAIRS_FROM_COLUMNS", 0)
    make, tolerance = STORAGES[storage]
    w = make(random_weight(rows=rows))
    x = np.random.default_rng(2).standard_normal((2, I)).astype(np.float32)
    assert_close(linear(x, w), linear_reference(x, w), tolerance)


DECODE_16 = {
    "fp16": (matvec.matvec_fp16, matvec.matvec_fp16_pairs),
    "bf16": (matvec.matvec_bf16, matvec.matvec_bf16_pairs),
}


@pytest.mark.parametrize("storage", DECODE_16)
@given(
    rows=st.integers(1, 13),
    columns=st.integers(0, 150),
    tokens=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_16_bit_decode_kernels_on_ragged_shapes(storage, rows, columns, tokens, seed):
    """Rows one at a time and in blocks of ROWS, whole 32-column lines in LLVM IR and the
    columns left over in numba: any row and column count (including none) gives x @ W.T."""
    rng = np.random.default_rng(seed)
    w = STORAGES[storage][0](rng.standard_normal((rows, columns)).astype(np.float32))
    x = rng.standard_normal((tokens, columns)).astype(np.float32)
    bits = w.view(np.uint16)
    expected = x @ to_float32(w).T
    for kernel in DECODE_16[storage]:
        out = np.full((tokens, rows), np.nan, dtype=np.float32)
        kernel(x, bits, out)
        np.testing.assert_allclose(out, expected, rtol=0, atol=EXACT * max(1, columns))


@pytest.mark.parametrize("storage", DECODE_16)
def test_16_bit_decode_widens_exactly(storage):
    """Every finite bit pattern, once per row, times a one-hot x: each output is that value."""
    bits = np.arange(2**16, dtype=np.uint16)
    values = to_float32(bits.view(np.float16) if storage == "fp16" else bits)
    bits = bits[np.isfinite(values)]
    expected = to_float32(bits.view(np.float16) if storage == "fp16" else bits)
    columns = 70  # two whole lines and a ragged tail
    for column in (3, 65):
        w = np.zeros((len(bits), columns), dtype=np.uint16)
        w[:, column] = bits
        x = np.zeros((1, columns), dtype=np.float32)
        x[0, column] = 1
        for kernel in DECODE_16[storage]:
            out = np.empty((1, len(bits)), dtype=np.float32)
            kernel(x, w, out)
            np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize("storage", ["fp16", "bf16", "int8 groups of 64", "int4 groups of 128"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_non_contiguous_inputs_and_bias(storage, tokens, small_blocks):
    """x a strided view with leading batch axes, a read-only Fortran-ordered weight, a bias."""
    make, tolerance = STORAGES[storage]
    w = make(random_weight())
    if isinstance(w, np.ndarray):
        w = np.asfortranarray(w)
        w.flags.writeable = False  # as memory-mapped checkpoints are
    wide = np.random.default_rng(2).standard_normal((2, tokens, 2 * I)).astype(np.float32)
    x = wide[..., ::2]  # [2, T, I], not contiguous
    bias = np.random.default_rng(3).standard_normal(O).astype(np.float16)
    actual = linear(x, w, bias)
    assert actual.shape == (2, tokens, O)
    assert_close(actual, linear_reference(x, w, bias), tolerance)


@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_16_bit_tiles_widen_exactly(storage):
    """Every finite bit pattern is widened to exactly numpy's float32 value: multiplied by the
    identity, each output is one product by 1 plus zeros."""
    bits = np.arange(2**16, dtype=np.uint16).reshape(256, 256)
    values = to_float32(bits.view(np.float16) if storage == "fp16" else bits)  # [256, 256]
    bits[~np.isfinite(values)] = 0  # inf * 0 would be NaN in the other columns' sums
    expected = to_float32(bits.view(np.float16) if storage == "fp16" else bits)
    identity = np.eye(256, dtype=np.float32)
    np.testing.assert_array_equal(tiles.project16(identity, bits, storage == "fp16"), expected.T)


def test_quantize_activations_rounds_each_block_to_127_steps():
    x = np.random.default_rng(4).standard_normal((2, 128)).astype(np.float32)
    x_q, x_scale = np.empty((2, 128), np.int8), np.empty((2, 4), np.float32)
    quantize_activations(x, 32, x_q, x_scale)
    assert x_q.dtype == np.int8 and x_scale.shape == (2, 4)
    assert np.abs(x_q).max(axis=-1).tolist() == [127, 127]
    restored = x_q.reshape(2, 4, 32) * x_scale[..., None]  # [T, blocks, 32]
    assert np.all(np.abs(restored.reshape(2, 128) - x) <= np.repeat(x_scale, 32, axis=1) / 2)


INTEGER_DOTS = [
    pytest.param(
        intdot.dot_int4_blocks_avx2,
        intdot.dot_int8_blocks_avx2,
        marks=pytest.mark.skipif(not intdot.HAS_AVX2, reason="the CPU has no AVX2"),
        id="avx2",
    ),
    pytest.param(
        intdot.dot_int4_blocks_avx512,
        intdot.dot_int8_blocks_avx512,
        marks=pytest.mark.skipif(not intdot.HAS_AVX512_VNNI, reason="no AVX-512 VNNI"),
        id="avx512-vnni",
    ),
]


def integer_dot_operands(n_groups: int, group_blocks: int, seed: int = 0):
    """Random operands of the integer dot kernels: weight bytes and two int8 activation rows
    [n*32], activation scales [n], weight scales as float16 bits [n_groups]."""
    rng = np.random.default_rng(seed)
    n = n_groups * group_blocks
    weight_bytes = rng.integers(0, 256, n * intdot.BLOCK_BYTES, dtype=np.uint8)
    x_even, x_odd = rng.integers(-127, 128, (2, n * intdot.BLOCK_BYTES), dtype=np.int8)
    x_scale = rng.uniform(0.5, 2.0, n).astype(np.float32)
    w_scale = rng.uniform(0.5, 2.0, n_groups).astype(np.float16)
    return weight_bytes, x_even, x_odd, x_scale, w_scale


def blockwise_dot(products: np.ndarray, x_scale, w_scale) -> float:
    """Σ_g w_scale[g] Σ_(b in g) x_scale[b] Σ_k products[b, k], in float64."""
    block_sums = products.reshape(len(x_scale), -1).sum(axis=1) * x_scale.astype(np.float64)
    return float((block_sums.reshape(len(w_scale), -1).sum(axis=1) * w_scale).sum())


@pytest.mark.parametrize("dot_int4, dot_int8", INTEGER_DOTS)
@pytest.mark.parametrize("n_groups, group_blocks", [(1, 1), (1, 2), (1, 5), (3, 1), (3, 4), (2, 7)])
def test_integer_dot_kernels_match_their_definition(dot_int4, dot_int8, n_groups, group_blocks):
    """Every group length, odd ones too (the AVX-512 kernels take blocks two at a time)."""

    @njit
    def int4(packed, x_even, x_odd, x_scale, w_scale):
        return dot_int4(
            packed.ctypes.data,
            x_even.ctypes.data,
            x_odd.ctypes.data,
            x_scale.ctypes.data,
            w_scale.ctypes.data,
            n_groups,
            group_blocks,
        )

    @njit
    def int8(q, x, x_scale, w_scale):
        addresses = q.ctypes.data, x.ctypes.data, x_scale.ctypes.data, w_scale.ctypes.data
        return dot_int8(*addresses, n_groups, group_blocks)

    weight_bytes, x_even, x_odd, x_scale, w_scale = integer_dot_operands(n_groups, group_blocks)
    unsigned = (weight_bytes ^ 0x88).astype(np.int64)  # both nibbles + 8, in 0..15
    int4_products = (unsigned >> 4) * x_even + (unsigned & 15) * x_odd
    expected_int4 = blockwise_dot(int4_products, x_scale, w_scale)
    actual_int4 = int4(weight_bytes, x_even, x_odd, x_scale, w_scale.view(np.uint16))
    assert actual_int4 == pytest.approx(expected_int4, rel=1e-5)

    q = weight_bytes.view(np.int8)
    q[::97] = -128  # the one value whose magnitude does not fit in int8
    expected_int8 = blockwise_dot(q.astype(np.int64) * x_even, x_scale, w_scale)
    actual_int8 = int8(q, x_even, x_scale, w_scale.view(np.uint16))
    assert actual_int8 == pytest.approx(expected_int8, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (64, 64), (130, 67), (17, 200)])
def test_transpose_matches_numpy(shape):
    """Whole and partial 64 x 64 tiles on both sides."""
    a = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    out = np.empty(shape[::-1], dtype=np.float32)
    transpose(a, out)
    np.testing.assert_array_equal(out, a.T)


def test_wrong_feature_count_is_a_clear_error():
    with pytest.raises(ValueError, match="x has 100 features, the weight expects 256"):
        linear(np.ones((1, 100), np.float32), random_weight().astype(np.float16))


def test_unsupported_weight_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype int32"):
        linear(np.ones((1, I), np.float32), np.ones((O, I), np.int32))


def attention_case(T, S):
    """4 query heads over 2 kv groups; the allowed mask is causal with a padded first slot."""
    rng = np.random.default_rng(T * 100 + S)
    q = rng.standard_normal((T, 8, 16)).astype(np.float32)[:, ::2]  # [T, 4, 16], strided
    keys, values = rng.standard_normal((2, S, 2, 16)).astype(np.float32)
    allowed = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]  # [T, S] causal
    if S > T:
        allowed[:, 0] = False  # left padding: never attended
    return q, keys, values, allowed


@pytest.mark.parametrize("T, S", [(1, 1), (1, 11), (3, 11), (7, 7)])
def test_fused_attention_matches_the_layers(T, S):
    q, keys, values, allowed = attention_case(T, S)
    assert_close(
        attention_context(q, keys, values, allowed), attention(q, keys, values, allowed), EXACT
    )


@pytest.mark.parametrize("T, S", [(1, 11), (5, 300)])
def test_direct_attention_kernel_matches_the_layers(T, S):
    """attention_context runs it on small problems (tests/test_long_context.py: the tiles)."""
    q, keys, values, allowed = attention_case(T, S)
    out = np.empty(q.shape, dtype=np.float32)
    fused_attention_serial(np.ascontiguousarray(q), keys, values, allowed, out)
    assert_close(out, attention(q, keys, values, allowed), EXACT)


@pytest.mark.parametrize("storage", ["fp32", "fp16", "bf16"])
def test_fused_rms_norm_matches_the_layer(storage):
    rng = np.random.default_rng(5)
    x = (8 * rng.standard_normal((2, 3, 2 * I))).astype(np.float32)[..., ::2]  # [2, 3, I] strided
    weight = STORAGES[storage][0](rng.standard_normal(I).astype(np.float32))
    assert_close(fused_rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), EXACT)


def test_model_without_trace_equals_the_readable_path(tmp_path):
    """forward() runs the fused kernels; forward(trace=True) the readable layers."""
    model = ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path, dtype="float16"))
    ids = np.arange(1, 10)
    cache, traced_cache = model.new_cache(), model.new_cache()
    for chunk in (ids[:6], ids[6:7], ids[7:]):  # a prefill, then decode steps over the cache
        fast = model.forward(chunk, cache=cache)
        readable, _ = model.forward(chunk, cache=traced_cache, trace=True)
        assert_close(fast, readable, EXACT)


def test_a_forked_child_computes_with_numpy_instead_of_openmp(tmp_path):
    """GNU OpenMP cannot run in a child forked after the pool started (numba terminates it):
    the exercise checker forks, so there the model must fall back to the NumPy layers."""
    import multiprocessing

    from glm_numpy import ChatGLM2
    from glm_numpy.testing import write_tiny_checkpoint

    model = ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path, dtype="float16"))
    ids = np.arange(3, 9)
    expected = model.forward(ids)  # starts numba's OpenMP pool in this process
    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=lambda: sender.send(model.forward(ids))
    )
    child.start()
    assert receiver.poll(60), f"the forked child died (exit code {child.exitcode})"
    np.testing.assert_allclose(receiver.recv(), expected, atol=1e-4)
    child.join()
    assert child.exitcode == 0


@pytest.mark.parametrize("user_value, expected", [(None, "4"), ("28", "28")])
def test_importing_glm_numpy_sets_openblas_thread_timeout(user_value, expected):
    """In a fresh interpreter, as a user's program starts (this one loaded OpenBLAS long ago);
    a value the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = "import os, glm_numpy; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected


@pytest.mark.parametrize(
    "user_setting, expected",
    [
        ({}, "ACTIVE 1000"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE None"),
        ({"GOMP_SPINCOUNT": "50000"}, "None 50000"),
    ],
)
def test_importing_the_kernels_sets_a_short_openmp_spin(user_setting, expected):
    """In a fresh interpreter (OpenMP reads these once); a user's own setting is kept whole."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user_setting)
    code = (
        "import os, glm_numpy.kernels; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected
