"""Prefill of quantised weights the integer kernels cannot take (float32 scales, groups of
under 32 bytes, no AVX2): widen a block of stored weight rows to float32 for BLAS sgemm.

With many tokens the product is compute-bound and sgemm needs float32 weights, but a float32
copy of the model does not fit in memory. So
``project`` widens W a block of rows at a time into a reused float32 buffer (small enough to
stay in cache) and multiplies each block as soon as it is ready.

    rows [start, stop) of W [O, I] in its stored form -> out [stop - start, I] float32

The products come out as [O, T] (a block of weight rows at a time); ``transpose`` turns them
into the [T, O] the layers use.

The quantised loops run over 1-D slices that start at 0: indexed from g * group instead, numba
cannot rule out a negative index, and its wraparound check kept LLVM from vectorising them
(int8/int4 widening took ~650 us per 512 x 4096 block instead of ~110, fp16's time).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.bits import scale_to_float32


@njit(parallel=True, cache=True)
def widen_int8(q, scale, start, out):
    """q [O, I] int8, scale [O, N] (float32, or float16 bits)
    -> out [n, I] = (q * scale)[start : start + n]."""
    n_groups = scale.shape[1]
    group = out.shape[1] // n_groups
    for r in prange(out.shape[0]):
        row = q[start + r]
        for g in range(n_groups):
            s = scale_to_float32(scale[start + r, g])
            src, dst = row[g * group : (g + 1) * group], out[r, g * group : (g + 1) * group]
            for i in range(group):
                dst[i] = np.float32(np.int32(src[i])) * s


@njit(parallel=True, cache=True)
def widen_int4(packed, scale, start, out):
    """packed [O, I/2] uint8 (column 2k in the high nibble of byte k, 2k+1 in the low one),
    scale [O, N] (float32, or float16 bits) -> out [n, I] = W[start : start + n] as float32."""
    n_groups = scale.shape[1]
    group = packed.shape[1] // n_groups  # bytes per group
    for r in prange(out.shape[0]):
        row = packed[start + r]
        for g in range(n_groups):
            s = scale_to_float32(scale[start + r, g])
            src = row[g * group : (g + 1) * group]
            dst = out[r, 2 * g * group : 2 * (g + 1) * group]
            for k in range(group):
                b = np.int32(src[k]) ^ 0x88  # both nibbles as s + 8 (see matvec)
                dst[2 * k] = np.float32(np.int32(b >> 4) - 8) * s
                dst[2 * k + 1] = np.float32(np.int32(b & 15) - 8) * s


TILE = 64  # 64 x 64 float32 = 16 KiB: a tile's reads and writes both stay in L1


@njit(parallel=True, cache=True)
def transpose(a, out):
    """a [R, C] float32 -> out [C, R] = a.T, one tile of rows at a time.

    numpy's copy of a transposed view walks one side with a long stride: at 512 tokens it took
    ~45 ms of a ~470 ms MLP projection; tile by tile it takes ~15 ms."""
    R, C = a.shape
    for tile_row in prange((R + TILE - 1) // TILE):
        r0 = tile_row * TILE
        r1 = min(r0 + TILE, R)
        for c0 in range(0, C, TILE):
            for c in range(c0, min(c0 + TILE, C)):
                for r in range(r0, r1):
                    out[c, r] = a[r, c]
