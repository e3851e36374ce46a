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

from glm_numpy.kernels.bits import fp16_bits_to_float32
from glm_numpy.kernels.intdot import BLOCK_BYTES, TILE_TOKENS, dot_int4_tile, dot_int8_tile
from glm_numpy.kernels.matvec import quantize_activations, split_int4_activations

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
