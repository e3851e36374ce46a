"""Multi-row kernels: y = x @ W.T for many rows of x (a prompt, or a batch of decode steps),
reading each stored weight row once for a whole tile of rows of x.

    x [T, I] float32, W [O, I] stored as
      int8 [O, I] + fp16 scales [O, N]             -> rows_int8  (integer dot products)
      int4 nibble pairs uint8 [O, I/2] + scales    -> rows_int4  (integer dot products)
    -> out [T, O] float32

Quantised weights: x is rounded to int8 exactly as the decode kernels round it
(matvec.quantize_activations, one scale per 32 weight bytes), and each output is computed by the
same integer sums in the same order as matvec_int*_blocks (intdot.dot_int*_tile). So a quantised
model computes one function whichever way its tokens arrive: all at once, one by one, or a
batch of users at a time. Needs AVX-512 VNNI (``intdot.HAS_AVX512_VNNI``); elsewhere the
dispatcher runs the decode kernels over every row (the same function, slower).

Blocking: the activation rows are taken TOKEN_BLOCK_BYTES at a time (they then stay in the
per-core L2 while every weight row streams past them once) and within a block TILE_TOKENS at a
time (the tile kernel's accumulators stay in registers). The output rows are split between the
threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.bits import bf16_bits_to_float32, fp16_bits_to_float32
from glm_numpy.kernels.intdot import BLOCK_BYTES, TILE_TOKENS, dot_int4_tile, dot_int8_tile
from glm_numpy.kernels.matvec import FASTMATH, quantize_activations, split_int4_activations

# Activation bytes per token block: 256 KiB stays in a 1 MiB L2 beside the weight rows.
TOKEN_BLOCK_BYTES = 256 * 1024


def padded_rows(tokens: int) -> int:
    """Rows of x rounded up to whole tiles (the extra rows are zero and their outputs unused)."""
    return -(-tokens // TILE_TOKENS) * TILE_TOKENS


@njit(parallel=True, cache=True)
def quantize_rows(x, block, x_q, x_scale):
    """quantize_activations, the rows split between the threads (each row as decode rounds it)."""
    T = x.shape[0]
    chunks = min(T, 8)
    for c in prange(chunks):
        start, stop = c * T // chunks, (c + 1) * T // chunks
        quantize_activations(x[start:stop], block, x_q[start:stop], x_scale[start:stop])


@njit(cache=True)
def _token_block(tokens, row_bytes):
    """Tokens per block: TOKEN_BLOCK_BYTES of activation rows, whole tiles, at least one."""
    tiles = min(tokens, TOKEN_BLOCK_BYTES // row_bytes) // TILE_TOKENS
    return max(TILE_TOKENS, tiles * TILE_TOKENS)


@njit(parallel=True, cache=True)
def rows_int8(x_u, x_scale, q, scale_bits, out):
    """x_u [T, I] uint8 = x_q + 128 and x_scale [T, I/32] (quantize_rows), q [O, I] int8,
    scale_bits [O, N] uint16 (fp16) -> out [T, O]; T a multiple of TILE_TOKENS."""
    T, I = x_u.shape
    n_groups = scale_bits.shape[1]
    group_blocks = I // n_groups // BLOCK_BYTES
    x_stride, scale_stride, out_stride = x_u.strides[0], x_scale.strides[0], out.strides[0]
    block = _token_block(T, I)
    for first in range(0, T, block):
        for o in prange(q.shape[0]):
            row, row_scales = q[o].ctypes.data, scale_bits[o].ctypes.data
            for t in range(first, min(first + block, T), TILE_TOKENS):
                dot_int8_tile(
                    row,
                    x_u[t].ctypes.data,
                    x_scale[t].ctypes.data,
                    row_scales,
                    n_groups,
                    group_blocks,
                    x_stride,
                    scale_stride,
                    out[t, o:].ctypes.data,
                    out_stride,
                )


@njit(parallel=True, cache=True)
def rows_int4(x_even, x_odd, x_scale, offsets, packed, scale_bits, out):
    """x_even/x_odd [T, I/2] int8, x_scale [T, I/64], offsets [T, N] (split_int4_activations),
    packed [O, I/2] uint8, scale_bits [O, N] uint16 (fp16) -> out [T, O]; T a multiple of
    TILE_TOKENS. The + 8 the nibbles carry is taken back per group as in matvec_int4_blocks."""
    T, half = x_even.shape
    n_groups = scale_bits.shape[1]
    group_blocks = half // n_groups // BLOCK_BYTES
    x_stride, scale_stride, out_stride = x_even.strides[0], x_scale.strides[0], out.strides[0]
    block = _token_block(T, 2 * half)
    for first in range(0, T, block):
        for o in prange(packed.shape[0]):
            row, row_scales = packed[o].ctypes.data, scale_bits[o].ctypes.data
            for t in range(first, min(first + block, T), TILE_TOKENS):
                dot_int4_tile(
                    row,
                    x_even[t].ctypes.data,
                    x_odd[t].ctypes.data,
                    x_scale[t].ctypes.data,
                    row_scales,
                    n_groups,
                    group_blocks,
                    x_stride,
                    scale_stride,
                    out[t, o:].ctypes.data,
                    out_stride,
                )
                for j in range(t, t + TILE_TOKENS):
                    correction = np.float32(0.0)
                    for g in range(n_groups):
                        correction += offsets[j, g] * fp16_bits_to_float32(scale_bits[o, g])
                    out[j, o] = out[j, o] - correction


def project_int8(x, q, scale_bits):
    """x [T, I] float32 -> x @ W.T [T, O] for W = q * scale (integer products, see above)."""
    T, I = x.shape
    rows = padded_rows(T)
    padded = np.zeros((rows, I), dtype=np.float32)
    padded[:T] = x
    x_q = np.empty((rows, I), dtype=np.int8)
    x_scale = np.empty((rows, I // BLOCK_BYTES), dtype=np.float32)
    quantize_rows(padded, BLOCK_BYTES, x_q, x_scale)
    out = np.empty((rows, q.shape[0]), dtype=np.float32)
    rows_int8(x_q.view(np.uint8) ^ np.uint8(0x80), x_scale, q, scale_bits, out)  # x + 128
    return out[:T]


def project_int4(x, packed, scale_bits):
    """x [T, I] float32 -> x @ W.T [T, O] for int4 W (integer products, see above)."""
    T, I = x.shape
    rows = padded_rows(T)
    n_groups = scale_bits.shape[1]
    padded = np.zeros((rows, I), dtype=np.float32)
    padded[:T] = x
    x_q = np.empty((rows, I), dtype=np.int8)
    x_scale = np.empty((rows, I // (2 * BLOCK_BYTES)), dtype=np.float32)
    quantize_rows(padded, 2 * BLOCK_BYTES, x_q, x_scale)
    x_even = np.empty((rows, I // 2), dtype=np.int8)
    x_odd = np.empty((rows, I // 2), dtype=np.int8)
    offsets = np.empty((rows, n_groups), dtype=np.float32)
    split_int4_activations(x_q, x_scale, n_groups, x_even, x_odd, offsets)
    out = np.empty((rows, packed.shape[0]), dtype=np.float32)
    rows_int4(x_even, x_odd, x_scale, offsets, packed, scale_bits, out)
    return out[:T]


def _make_tile16(widen):
    """The 16-bit tile dot product for one bit format (widen: uint16 -> float32)."""

    @njit(inline="always", fastmath=FASTMATH)
    def tile(w0, w1, x0, x1, x2, x3):
        """w0, w1 [I] uint16 bits, x0..x3 [I] float32 -> the 8 dot products (w0 with x0..x3,
        then w1): each weight is widened once and each x loaded once for two rows."""
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for i in range(w0.shape[0]):
            v, u = widen(w0[i]), widen(w1[i])
            a0 += v * x0[i]
            a1 += v * x1[i]
            a2 += v * x2[i]
            a3 += v * x3[i]
            b0 += u * x0[i]
            b1 += u * x1[i]
            b2 += u * x2[i]
            b3 += u * x3[i]
        return a0, a1, a2, a3, b0, b1, b2, b3

    return tile


_tile_fp16 = _make_tile16(fp16_bits_to_float32)
_tile_bf16 = _make_tile16(bf16_bits_to_float32)


@njit(inline="always")
def _rows16(x, w, out, tile):
    """x [T, I] float32 (T a multiple of 4), w [O, I] uint16 -> out [T, O] = x @ W.T:
    float32-exact products, two weight rows x four rows of x per pass."""
    T, I = x.shape
    O = w.shape[0]
    block = _token_block(T, 4 * I)
    for first in range(0, T, block):
        for pair in prange((O + 1) // 2):
            o0 = 2 * pair
            o1 = min(o0 + 1, O - 1)  # an odd last row is paired with itself
            for t in range(first, min(first + block, T), 4):
                a0, a1, a2, a3, b0, b1, b2, b3 = tile(
                    w[o0], w[o1], x[t], x[t + 1], x[t + 2], x[t + 3]
                )
                out[t, o0], out[t + 1, o0], out[t + 2, o0], out[t + 3, o0] = a0, a1, a2, a3
                out[t, o1], out[t + 1, o1], out[t + 2, o1], out[t + 3, o1] = b0, b1, b2, b3


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def rows_fp16(x, w, out):
    """x [T, I] float32 (T a multiple of 4), w [O, I] uint16 fp16 bits -> out [T, O] = x @ W.T."""
    _rows16(x, w, out, _tile_fp16)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def rows_bf16(x, w, out):
    """rows_fp16 for bf16 bits."""
    _rows16(x, w, out, _tile_bf16)
