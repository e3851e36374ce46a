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
per-core L2 while every weight row streams past them once) and within a block in tiles of
INT4_TILE_ROWS / INT8_TILE_ROWS weight rows x TILE_TOKENS tokens (intdot: each weight pair
unpacked once for 4 tokens, each activation pair loaded once for 2 or 4 rows, the accumulators
in registers). The tiles of output rows are split between the threads; the last, partial one
reads a zero-padded copy of the ragged rows (ragged_tail). int4's + 8 correction is taken back
afterwards for all tokens of a row at once, summed over groups in decode's order: as a scalar
loop per token and row after each tile it halved the speed with groups of 128 (2 x 4 tiles:
69-71 GOP/s at 128-512 tokens with it, 135-136 without; consecutive runs).

[13696, 4096], 2 threads, GOP/s at 16 / 128 / 512 tokens, the previous kernel (1 x 4 tiles,
scalar correction) -> these; best of 5 rounds alternating the two while other processes loaded
the machine, so compare the ratios: int4 per row 186 / 191 / 192 -> 308 / 308 / 318 (1.6-1.7x),
int4 groups of 128 153 / 142 / 145 -> 147 / 181 / 167, int8 per row 188 / 194 / 193 -> 182 /
242 / 243. Decode is unchanged (same kernels; 8 matrices [13696, 4096] read out of cache, best
of 5: int4 30.9 -> 31.7 GB/s, int4 groups of 128 22.6 -> 23.4, int8 34.1 -> 33.3).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.bits import fp16_bits_to_float32
from glm_numpy.kernels.intdot import (
    BLOCK_BYTES,
    INT4_TILE_ROWS,
    INT8_TILE_ROWS,
    TILE_TOKENS,
    dot_int4_tile,
    dot_int8_tile,
)
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


def ragged_tail(weights, scale_bits, tile_rows):
    """The last O % tile_rows weight rows and their scales, padded with zero rows to a whole
    tile (read-only, as the stored arrays are: one numba specialisation)."""
    O = weights.shape[0]
    tail = np.zeros((tile_rows, weights.shape[1]), dtype=weights.dtype)
    tail_scales = np.zeros((tile_rows, scale_bits.shape[1]), dtype=scale_bits.dtype)
    rest = O % tile_rows
    if rest:
        tail[:rest], tail_scales[:rest] = weights[O - rest :], scale_bits[O - rest :]
    tail.flags.writeable = tail_scales.flags.writeable = False
    return tail, tail_scales


@njit(inline="always")
def _tile_operands(weights, scale_bits, tail, tail_scales, o):
    """A tile's weight rows from row o (from the padded tail past the last whole tile):
    (weights, their scales) as 2-D arrays whose row 0 is row o."""
    if o + tail.shape[0] <= weights.shape[0]:
        return weights[o:], scale_bits[o:]
    return tail, tail_scales


@njit(parallel=True, cache=True)
def rows_int8(x_u, x_scale, q, scale_bits, tail, tail_scales, out):
    """x_u [T, I] uint8 = x_q + 128 and x_scale [T, I/32] (quantize_rows), q [O, I] int8,
    scale_bits [O, N] uint16 (fp16), tail/tail_scales (ragged_tail, INT8_TILE_ROWS) -> out
    [T, O'] (O' >= O, whole tiles); T a multiple of TILE_TOKENS."""
    T, I = x_u.shape
    n_groups = scale_bits.shape[1]
    group_blocks = I // n_groups // BLOCK_BYTES
    x_stride, scale_stride, out_stride = x_u.strides[0], x_scale.strides[0], out.strides[0]
    block = _token_block(T, I)
    for first in range(0, T, block):
        for tile in prange(out.shape[1] // INT8_TILE_ROWS):
            o = tile * INT8_TILE_ROWS
            rows, row_scales = _tile_operands(q, scale_bits, tail, tail_scales, o)
            for t in range(first, min(first + block, T), TILE_TOKENS):
                operands = (
                    rows.ctypes.data,
                    rows.strides[0],
                    x_u[t].ctypes.data,
                    x_scale[t].ctypes.data,
                    row_scales.ctypes.data,
                    row_scales.strides[0],
                    n_groups,
                    group_blocks,
                    x_stride,
                    scale_stride,
                    out[t, o:].ctypes.data,
                    out_stride,
                )
                dot_int8_tile(*operands)


@njit(parallel=True, cache=True)
def rows_int4(x_even, x_odd, x_scale, offsets, packed, scale_bits, tail, tail_scales, out):
    """x_even/x_odd [T, I/2] int8, x_scale [T, I/64], offsets [T, N] (split_int4_activations),
    packed [O, I/2] uint8, scale_bits [O, N] uint16 (fp16), tail/tail_scales (ragged_tail,
    INT4_TILE_ROWS) -> out [T, O'] (O' >= O, whole tiles); T a multiple of TILE_TOKENS. The + 8
    the nibbles carry is taken back per group as in matvec_int4_blocks."""
    T, half = x_even.shape
    n_groups = scale_bits.shape[1]
    group_blocks = half // n_groups // BLOCK_BYTES
    x_stride, scale_stride, out_stride = x_even.strides[0], x_scale.strides[0], out.strides[0]
    block = _token_block(T, 2 * half)
    for first in range(0, T, block):
        for tile in prange(out.shape[1] // INT4_TILE_ROWS):
            o = tile * INT4_TILE_ROWS
            rows, row_scales = _tile_operands(packed, scale_bits, tail, tail_scales, o)
            for t in range(first, min(first + block, T), TILE_TOKENS):
                operands = (
                    rows.ctypes.data,
                    rows.strides[0],
                    x_even[t].ctypes.data,
                    x_odd[t].ctypes.data,
                    x_scale[t].ctypes.data,
                    row_scales.ctypes.data,
                    row_scales.strides[0],
                    n_groups,
                    group_blocks,
                    x_stride,
                    scale_stride,
                    out[t, o:].ctypes.data,
                    out_stride,
                )
                dot_int4_tile(*operands)
    # out[t, o] -= Σ_g offsets[t, g] * scale[o, g], summed over g in order as decode does, all
    # tokens at once (a loop over 16 lanes of tokens instead of one scalar chain per token).
    by_group = np.ascontiguousarray(offsets.T)  # [N, T]
    for o in prange(packed.shape[0]):
        correction = np.zeros(T, dtype=np.float32)
        for g in range(n_groups):
            scale = fp16_bits_to_float32(scale_bits[o, g])
            for j in range(T):
                correction[j] += by_group[g, j] * scale
        for j in range(T):
            out[j, o] = out[j, o] - correction[j]


def _whole_tiles(out, T, O):
    """out [rows, O'] -> its [T, O] part, contiguous."""
    return out[:T] if out.shape[1] == O else np.ascontiguousarray(out[:T, :O])


def project_int8(x, q, scale_bits):
    """x [T, I] float32 -> x @ W.T [T, O] for W = q * scale (integer products, see above)."""
    T, I = x.shape
    O = q.shape[0]
    rows = padded_rows(T)
    padded = np.zeros((rows, I), dtype=np.float32)
    padded[:T] = x
    x_q = np.empty((rows, I), dtype=np.int8)
    x_scale = np.empty((rows, I // BLOCK_BYTES), dtype=np.float32)
    quantize_rows(padded, BLOCK_BYTES, x_q, x_scale)
    out = np.empty((rows, -(-O // INT8_TILE_ROWS) * INT8_TILE_ROWS), dtype=np.float32)
    x_u = x_q.view(np.uint8) ^ np.uint8(0x80)  # x + 128
    tail = ragged_tail(q, scale_bits, INT8_TILE_ROWS)
    rows_int8(x_u, x_scale, q, scale_bits, *tail, out)
    return _whole_tiles(out, T, O)


def project_int4(x, packed, scale_bits):
    """x [T, I] float32 -> x @ W.T [T, O] for int4 W (integer products, see above)."""
    T, I = x.shape
    O = packed.shape[0]
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
    out = np.empty((rows, -(-O // INT4_TILE_ROWS) * INT4_TILE_ROWS), dtype=np.float32)
    tail = ragged_tail(packed, scale_bits, INT4_TILE_ROWS)
    rows_int4(x_even, x_odd, x_scale, offsets, packed, scale_bits, *tail, out)
    return _whole_tiles(out, T, O)
