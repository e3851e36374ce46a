"""bfloat16 products with AVX512-BF16 (``vdpbf16ps``): the opt-in ``compute="bf16"`` mode.

    x [T, I] float32, W [O, I] 16-bit -> out [T, O] ≈ bf16(x) @ bf16(W).T, summed in float32

This is what torch does for a bf16 model on a CPU: the activations are rounded to bfloat16 (8
significant bits) and each ``vdpbf16ps`` multiplies 32 bf16 pairs and adds neighbouring products
into 16 float32 sums: 32 multiply-adds per instruction where float32 FMA does 16, and half the
bytes of x to load. bf16 weights are used as stored; fp16 weights are rounded to bf16 as they are
packed (they lose 3 of their 11 significant bits). docs/numerics.md gives the error against
float32, measured.

The kernel is glm_numpy.kernels.tiles' outer-product panel kernel with a step of two columns:
lane j of an accumulator holds token j's sum for one weight row, each step loads the tokens'
(x[j, 2k], x[j, 2k + 1]) pairs as one vector and broadcasts the row's (W[o, 2k], W[o, 2k + 1])
pair from the packed panel into ``vdpbf16ps zmm, zmm, m32{1to16}``. Packing, blocking and the
prefetching of the next rows are tiles' (``tiled_rows``, ``streamed_rows``); odd I is padded.

Measured (linear, [13696, 4096], both cores, 16 / 128 / 512 tokens, GFLOP/s, best of 7, two
rounds in one lock hold on a shared, noisy machine): bf16 weights 315 / 360-366 / 386-431 with
4 x 6 tiles of horizontal dot products, 454-456 / 658-715 / 717-747 with this kernel; fp16
weights 129-139 / 272-303 / 387-401 -> 355-357 / 706 / 723-728; torch bf16 ``F.linear`` in the
same rounds 191-360 / 627-782 / 732-788.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from glm_numpy.kernels import tiles
from glm_numpy.kernels.bits import fp16_bits_to_float32
from glm_numpy.kernels.tiles import (
    MIDDLE,
    NARROW,
    WIDE,
    pack_tokens,
    panel_kernel,
    streamed_rows,
    tiled_rows,
)

HAS_AVX512_BF16 = "+avx512bf16" in set(llvm.get_host_cpu_features().flatten().split(","))

_words = ir.VectorType(ir.IntType(32), 16)  # 32 bf16 values as the instruction's integer view
_floats = ir.VectorType(ir.FloatType(), 16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it)."""

    def _to_string(self) -> str:
        return "bfloat"


_bf16_pairs = ir.VectorType(_BFloat(), 32)


def _broadcast_pair(builder: ir.IRBuilder, address) -> ir.Value:
    """The two bf16 values at address in every 32-bit lane (folded in as m32{1to16})."""
    pair = builder.load(builder.inttoptr(address, ir.IntType(32).as_pointer()), align=4)
    single = builder.insert_element(ir.Constant(_words, None), pair, ir.Constant(ir.IntType(32), 0))
    zeros = ir.Constant(_words, [ir.Constant(ir.IntType(32), 0)] * 16)
    return builder.shuffle_vector(single, ir.Constant(_words, None), zeros)


def _dpbf16ps(builder: ir.IRBuilder, acc, a, b) -> ir.Value:
    """acc [16 x float] + a[2i] * b[2i] + a[2i+1] * b[2i+1] in lane i (products exact)."""
    module = builder.module
    name = "llvm.x86.avx512bf16.dpbf16ps.512"
    function = module.globals.get(name) or ir.Function(
        module, ir.FunctionType(_floats, [_floats, _bf16_pairs, _bf16_pairs]), name
    )
    pairs = [builder.bitcast(v, _bf16_pairs) for v in (a, b)]
    return builder.call(function, [acc, *pairs])


_wide, _middle, _narrow = (
    panel_kernel(s, _broadcast_pair, _dpbf16ps) for s in (WIDE, MIDDLE, NARROW)
)
_streaming = panel_kernel(NARROW, _broadcast_pair, _dpbf16ps, prefetching=True)


@intrinsic
def _float_bits(typingctx, value):
    """float32 -> its bits as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(inline="always")
def copy_pairs(w, row, first, steps, panel_row):
    """panel_row[:2 steps] = bf16 W[row, 2 first : 2 (first + steps)] (a step is 2 columns)."""
    source = w[row, 2 * first : 2 * (first + steps)]
    for i in range(2 * steps):
        panel_row[i] = source[i]


@njit(inline="always")
def round_fp16_pairs(w, row, first, steps, panel_row):
    """copy_pairs for fp16 W, each value rounded to bf16 (to nearest even, as
    glm_numpy.dtypes.float32_to_bfloat16)."""
    source = w[row, 2 * first : 2 * (first + steps)]
    for i in range(2 * steps):
        panel_row[i] = _to_bf16(fp16_bits_to_float32(source[i]))


@njit(inline="always")
def _round_pairs(x, t, first, count, tile, j):
    """tile[k, j] = token t's columns 2 (first + k) and 2 (first + k) + 1 rounded to bf16 (as
    glm_numpy.dtypes.float32_to_bfloat16: to nearest even, NaN stays NaN); past I, zero."""
    I = x.shape[1]
    for k in range(count):
        for e in range(2):
            column = 2 * (first + k) + e
            if column < I:
                tile[k, j, e] = _to_bf16(x[t, column])


@njit(inline="always")
def _to_bf16(value):
    bits = _float_bits(value)
    if bits & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
        return np.uint16(0x7FC0)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return np.uint16((bits + rounding) >> np.uint32(16))


@njit(parallel=True, cache=True)
def pack_bf16_pairs(x, xp):
    """x [T, I] float32 -> xp [blocks, G, PANEL_STEPS, 16, 2] uint16, bf16(x) in column pairs
    (see tiles.pack_tokens)."""
    pack_tokens(x, xp, (x.shape[1] + 1) // 2, _round_pairs)


@njit(parallel=True, cache=True)
def rows_bf16_compute(xp, w_bits, out, panel_like, sums_like):
    """bf16(x) @ W.T for bf16 bits w_bits [O, I], I even (see tiles.tiled_rows)."""
    steps = w_bits.shape[1] // 2
    tiled_rows(
        xp, w_bits, steps, 4, out, panel_like, sums_like, copy_pairs, _wide, _middle, _narrow
    )


@njit(parallel=True, cache=True)
def rows_fp16_bf16_compute(xp, w_bits, out, panel_like, sums_like):
    """As rows_bf16_compute for fp16 bits, rounded to bf16 as they are packed."""
    steps = w_bits.shape[1] // 2
    tiled_rows(
        xp, w_bits, steps, 4, out, panel_like, sums_like, round_fp16_pairs, _wide, _middle, _narrow
    )


@njit(parallel=True, cache=True)
def few_rows_bf16_compute(xp, w_bits, out, panel_like, sums_like):
    """rows_bf16_compute for at most 16 tokens (see tiles.streamed_rows)."""
    steps = w_bits.shape[1] // 2
    streamed_rows(xp, w_bits, steps, 4, out, panel_like, sums_like, copy_pairs, _streaming)


@njit(parallel=True, cache=True)
def few_rows_fp16_bf16_compute(xp, w_bits, out, panel_like, sums_like):
    """rows_fp16_bf16_compute for at most 16 tokens (see tiles.streamed_rows)."""
    steps = w_bits.shape[1] // 2
    streamed_rows(xp, w_bits, steps, 4, out, panel_like, sums_like, round_fp16_pairs, _streaming)


def project_bf16(x: np.ndarray, w_bits: np.ndarray, fp16: bool) -> np.ndarray:
    """x [T, I] float32, w_bits [O, I] uint16 (bf16, or fp16 when fp16) -> [T, O] float32
    = bf16(x) @ bf16(W).T summed in float32. Ragged T, O and I are padded with zeros."""
    T, I = x.shape
    if I % 2:  # rare (not in ChatGLM2's sizes): a padded copy of the weight, whole pairs
        w_bits = np.pad(w_bits, ((0, 0), (0, 1)))
        w_bits.flags.writeable = False  # as the dispatcher's views: one numba specialisation
    steps = w_bits.shape[1] // 2
    shape = (
        -(-steps // tiles.PANEL_STEPS),
        -(-T // tiles.LANES),
        tiles.PANEL_STEPS,
        tiles.LANES,
        2,
    )
    xp = np.zeros(shape, dtype=np.uint16)  # [blocks, G, PANEL_STEPS, 16, 2]
    pack_bf16_pairs(x, xp)
    out = np.empty((T, w_bits.shape[0]), dtype=np.float32)
    panel_like, sums_like = tiles.scratch(T, np.uint32)
    if T <= tiles.LANES:
        kernel = few_rows_fp16_bf16_compute if fp16 else few_rows_bf16_compute
    else:
        kernel = rows_fp16_bf16_compute if fp16 else rows_bf16_compute
    tiles.run_blocks(kernel, T, xp, w_bits, out, panel_like.view(np.uint16), sums_like)
    return out
