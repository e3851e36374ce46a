"""Decode kernels: y = x @ W.T for a few rows of x, reading W once in its stored form.

One decoded token multiplies a single activation row by every weight matrix, so the time is the
time to stream the weights from memory. Each kernel widens the stored values to float32 in
registers (never in memory) and splits the output rows between the threads with ``prange``.

    x [T, I] float32 (T small), W [O, I] stored as
      fp16 / bf16 bits (uint16)                     -> matvec_fp16 / matvec_bf16
                                                       (or *_pairs for long rows: blocks of
                                                       4 rows; glm_numpy.kernels.stream16)
      int8 [O, I], scale [O, N] (N groups per row)  -> matvec_int8
      int4 nibble pairs, uint8 [O, I/2], scale      -> matvec_int4
    -> out [T, O] float32

With AVX2 (or AVX-512 VNNI), matvec_int8_blocks / matvec_int4_blocks quantise x to int8 as
well and multiply integers (glm_numpy.kernels.intdot): 3-4x fewer instructions per weight,
which is what lets 4-bit weights stream at memory speed. x's rounding (one scale per 32
bytes, as llama.cpp's q8 activations) moves results by about 0.5 % of their size. The
multi-row kernels (glm_numpy.kernels.multirow) round x the same way and agree bit for bit.

The 16-bit kernels take each row's whole 64-byte lines in LLVM IR (stream16: 512-bit widening
and FMAs, the weights prefetched in software) and its last I % 32 columns in numba. Measured
against the numba loops they replace (Zen 5, 2 threads, a busy VM; one process, kernels
alternated; weights memory-mapped from the fp16 checkpoint's file): see stream16's docstring.

Per-row scales (the official scheme) are the case N = 1: one group spanning the whole row.
The inner loops run over 1-D slices and widen integers through int32: written that way LLVM turns
them into 8-wide AVX2 loops (2-D indexing or int64 conversions fall back to scalar code).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.bits import bf16_bits_to_float32, fp16_bits_to_float32, scale_to_float32
from glm_numpy.kernels.intdot import BLOCK_BYTES, dot_int4_blocks, dot_int8_blocks
from glm_numpy.kernels.stream16 import (
    LINE,
    ROWS,
    dot_row_bf16,
    dot_row_fp16,
    dot_rows_bf16,
    dot_rows_fp16,
)

# Let LLVM reorder float sums (reassoc) so the inner loops vectorise; inf/NaN semantics are kept.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# The row dot products below are inlined into the parallel kernels by numba itself
# (inline="always") rather than called as compiled functions: a parallel kernel loaded from
# numba's on-disk cache that calls a separately compiled helper streamed fp16 weights at ~38 GB/s,
# the same kernel freshly compiled at ~50 (numba issue 8085; Zen 5, 2 threads, [65536, 4096]).


@njit(inline="always", fastmath=FASTMATH)
def _dot_int8(q, x):
    """q [n] int8, x [n] float32 -> q · x."""
    acc = np.float32(0.0)
    for i in range(q.shape[0]):
        acc += np.float32(np.int32(q[i])) * x[i]
    return acc


@njit(inline="always", fastmath=FASTMATH)
def _dot_int4_offset(packed, x_even, x_odd):
    """packed [n] uint8, x_even/x_odd [n] float32 -> sum over both nibbles of (s + 8) * x.

    Flipping bit 3 of a signed nibble s in -8..7 (xor 8) gives s + 8 in 0..15, an unsigned value
    that widens to float without a branch; the caller takes the + 8 back once per group.
    """
    acc = np.float32(0.0)
    for k in range(packed.shape[0]):
        b = np.int32(packed[k]) ^ 0x88
        acc += np.float32(np.int32(b >> 4)) * x_even[k] + np.float32(np.int32(b & 15)) * x_odd[k]
    return acc


@njit(inline="always", fastmath=FASTMATH)
def _rows16(x, w, out, dot_row, widen):
    """The parallel loop of matvec_fp16 / matvec_bf16: rows split between the threads, each row's
    whole LINEs in LLVM IR (stream16), its last I % LINE columns here."""
    O, I = w.shape
    lines = I // LINE
    for o in prange(O):
        for t in range(x.shape[0]):
            total = dot_row(w[o].ctypes.data, x[t].ctypes.data, lines)
            for i in range(lines * LINE, I):
                total += widen(w[o, i]) * x[t, i]
            out[t, o] = total


@njit(inline="always", fastmath=FASTMATH)
def _row_blocks16(x, w, out, dot_rows, dot_row, widen):
    """_rows16 in blocks of ROWS rows that share each load of x (for x too long for L1); the
    last O % ROWS rows one at a time."""
    O, I = w.shape
    lines = I // LINE
    for block in prange(O // ROWS):
        o = block * ROWS
        for t in range(x.shape[0]):
            x_row = x[t].ctypes.data
            dot_rows(w[o].ctypes.data, x_row, lines, w.strides[0], out[t, o:].ctypes.data)
            for r in range(o, o + ROWS):
                for i in range(lines * LINE, I):
                    out[t, r] += widen(w[r, i]) * x[t, i]
    for o in range(O // ROWS * ROWS, O):
        for t in range(x.shape[0]):
            total = dot_row(w[o].ctypes.data, x[t].ctypes.data, lines)
            for i in range(lines * LINE, I):
                total += widen(w[o, i]) * x[t, i]
            out[t, o] = total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_fp16(x, w, out):
    """x [T, I] float32 (rows contiguous), w [O, I] uint16 (fp16 bits, rows contiguous)
    -> out [T, O] (rows contiguous) = x @ W.T."""
    _rows16(x, w, out, dot_row_fp16, fp16_bits_to_float32)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_bf16(x, w, out):
    """matvec_fp16 for bf16 bits."""
    _rows16(x, w, out, dot_row_bf16, bf16_bits_to_float32)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_fp16_pairs(x, w, out):
    """matvec_fp16 for rows so long that x [I] falls out of L1 (the MLP's down projection,
    I = 13696: x is 54 KiB): ROWS rows at a time, so each element of x loaded serves ROWS rows.
    (The name is from when the blocks were pairs.)"""
    _row_blocks16(x, w, out, dot_rows_fp16, dot_row_fp16, fp16_bits_to_float32)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_bf16_pairs(x, w, out):
    """matvec_fp16_pairs for bf16 bits."""
    _row_blocks16(x, w, out, dot_rows_bf16, dot_row_bf16, bf16_bits_to_float32)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_int8(x, q, scale, out):
    """x [T, I] float32, q [O, I] int8, scale [O, N] (float32, or float16 bits) -> out [T, O].

    W[o, i] = q[o, i] * scale[o, i // (I/N)]: each group's dot product is scaled once.
    """
    n_groups = scale.shape[1]
    group = x.shape[1] // n_groups
    for o in prange(q.shape[0]):
        row = q[o]
        for t in range(x.shape[0]):
            total = np.float32(0.0)
            for g in range(n_groups):
                cols = slice(g * group, (g + 1) * group)
                total += _dot_int8(row[cols], x[t, cols]) * scale_to_float32(scale[o, g])
            out[t, o] = total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_int4(x_even, x_odd, x_group_sums, packed, scale, out):
    """x_even/x_odd [T, I/2] (columns 0,2,4.. and 1,3,5.. of x), x_group_sums [T, N] (x summed
    over each group), packed [O, I/2] uint8, scale [O, N] (float32, or float16 bits) -> out [T, O].

    Byte k of a row holds the signed nibbles of columns 2k (high) and 2k+1 (low).
    """
    n_groups = scale.shape[1]
    group = x_even.shape[1] // n_groups  # packed bytes per group
    eight = np.float32(8.0)
    for o in prange(packed.shape[0]):
        row = packed[o]
        for t in range(x_even.shape[0]):
            total = np.float32(0.0)
            for g in range(n_groups):
                cols = slice(g * group, (g + 1) * group)
                offset_dot = _dot_int4_offset(row[cols], x_even[t, cols], x_odd[t, cols])
                total += (offset_dot - eight * x_group_sums[t, g]) * scale_to_float32(scale[o, g])
            out[t, o] = total


@njit(cache=True)
def quantize_activations(x, block, x_q, x_scale):
    """x [T, n] float32 -> x_q [T, n] int8 in -127..127 and x_scale [T, n/block] float32,
    x ≈ x_q * x_scale with one absmax scale per block of columns. (One thread, one pass: at a
    token per step, numpy's several passes and the thread pool's wake-up cost more.)"""
    T, n = x.shape
    for t in range(T):
        for b in range(n // block):
            largest = np.float32(0.0)
            for i in range(b * block, (b + 1) * block):
                largest = max(largest, abs(x[t, i]))
            scale = largest / np.float32(127.0)
            x_scale[t, b] = scale
            inverse = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
            for i in range(b * block, (b + 1) * block):
                x_q[t, i] = np.int8(np.rint(x[t, i] * inverse))


@njit(cache=True)
def split_int4_activations(x_q, x_scale, n_groups, x_even, x_odd, offsets):
    """x_q [T, I] int8, x_scale [T, I/64] -> x_even/x_odd [T, I/2] (its even and odd columns)
    and offsets [T, N] = 8 * Σ x_q * x_scale over each group of I/N columns."""
    T, I = x_q.shape
    per_group = I // n_groups
    for t in range(T):
        for g in range(n_groups):
            offsets[t, g] = 0.0
        for k in range(I // 2):
            x_even[t, k] = x_q[t, 2 * k]
            x_odd[t, k] = x_q[t, 2 * k + 1]
        for i in range(I):
            offsets[t, i // per_group] += np.float32(8.0) * x_q[t, i] * x_scale[t, i // 64]


@njit(parallel=True, cache=True)
def matvec_int8_blocks(x, q, scale_bits, out):
    """x [T, I] float32, q [O, I] int8, scale_bits [O, N] uint16 (fp16) -> out [T, O] ≈ x @ W.T.

    x is rounded to int8 (one scale per block of 32 columns) and the products are integer
    (intdot.dot_int8_blocks); needs I/N to be a multiple of 32."""
    T, I = x.shape
    x_q = np.empty((T, I), dtype=np.int8)
    x_scale = np.empty((T, I // BLOCK_BYTES), dtype=np.float32)
    quantize_activations(x, BLOCK_BYTES, x_q, x_scale)
    n_groups = scale_bits.shape[1]
    group_blocks = I // n_groups // BLOCK_BYTES
    for o in prange(q.shape[0]):
        row, row_scales = q[o].ctypes.data, scale_bits[o].ctypes.data
        for t in range(T):
            xs, ss = x_q[t].ctypes.data, x_scale[t].ctypes.data
            out[t, o] = dot_int8_blocks(row, xs, ss, row_scales, n_groups, group_blocks)


@njit(parallel=True, cache=True)
def matvec_int4_blocks(x, packed, scale_bits, out):
    """x [T, I] float32, packed [O, I/2] uint8, scale_bits [O, N] uint16 (fp16)
    -> out [T, O] ≈ x @ W.T.

    x is rounded to int8 (one scale per 64 columns = 32 stored bytes) and split into its even
    and odd columns, which meet the high and low nibbles of each byte in the integer products
    (intdot.dot_int4_blocks); the + 8 the nibbles carry (see matvec_int4) is taken back per
    group with 8 * Σ x. Needs I/N to be a multiple of 64."""
    T, I = x.shape
    n_groups = scale_bits.shape[1]
    x_q = np.empty((T, I), dtype=np.int8)
    x_scale = np.empty((T, I // (2 * BLOCK_BYTES)), dtype=np.float32)
    quantize_activations(x, 2 * BLOCK_BYTES, x_q, x_scale)
    x_even = np.empty((T, I // 2), dtype=np.int8)
    x_odd = np.empty((T, I // 2), dtype=np.int8)
    offsets = np.empty((T, n_groups), dtype=np.float32)
    split_int4_activations(x_q, x_scale, n_groups, x_even, x_odd, offsets)
    group_blocks = packed.shape[1] // n_groups // BLOCK_BYTES
    for o in prange(packed.shape[0]):
        row, row_scales = packed[o].ctypes.data, scale_bits[o].ctypes.data
        for t in range(T):
            even, odd = x_even[t].ctypes.data, x_odd[t].ctypes.data
            dot = dot_int4_blocks(
                row, even, odd, x_scale[t].ctypes.data, row_scales, n_groups, group_blocks
            )
            correction = np.float32(0.0)
            for g in range(n_groups):
                correction += offsets[t, g] * fp16_bits_to_float32(scale_bits[o, g])
            out[t, o] = dot - correction
