"""Decode kernels: y = x @ W.T for a few rows of x, reading W once in its stored form.

One decoded token multiplies a single activation row by every weight matrix, so the time is
the time to stream the weights from memory. Each kernel widens the stored values to float32 in
registers (never in memory) and splits the output rows between the threads with ``prange``.

    x [T, I] float32 (T small), W [O, I] stored as
      fp16 / bf16 bits (uint16)                  -> matvec_fp16 / matvec_bf16
      int8, scale [O, N] (N groups per row)      -> matvec_int8
      int4 nibble pairs as uint8 [O, I/2], scale -> matvec_int4
    -> out [T, O] float32

Per-row scales (the official scheme) are the case N = 1: one group spanning the whole row.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.bits import bf16_bits_to_float32, fp16_bits_to_float32

# Let LLVM reorder float sums (reassoc) so the inner loops vectorise; inf/NaN semantics are kept.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_fp16(x, w, out):
    """x [T, I] float32, w [O, I] uint16 (fp16 bits) -> out [T, O] = x @ W.T."""
    T, I = x.shape
    for o in prange(w.shape[0]):
        for t in range(T):
            acc = np.float32(0.0)
            for i in range(I):
                acc += fp16_bits_to_float32(w[o, i]) * x[t, i]
            out[t, o] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_bf16(x, w, out):
    """x [T, I] float32, w [O, I] uint16 (bf16 bits) -> out [T, O] = x @ W.T."""
    T, I = x.shape
    for o in prange(w.shape[0]):
        for t in range(T):
            acc = np.float32(0.0)
            for i in range(I):
                acc += bf16_bits_to_float32(w[o, i]) * x[t, i]
            out[t, o] = acc


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_int8(x, q, scale, out):
    """x [T, I] float32, q [O, I] int8, scale [O, N] float32 -> out [T, O].

    W[o, i] = q[o, i] * scale[o, i // (I/N)]: each group's integer dot product is scaled once.
    """
    T, I = x.shape
    n_groups = scale.shape[1]
    group = I // n_groups
    for o in prange(q.shape[0]):
        for t in range(T):
            total = np.float32(0.0)
            for g in range(n_groups):
                acc = np.float32(0.0)
                for i in range(g * group, (g + 1) * group):
                    acc += np.float32(q[o, i]) * x[t, i]
                total += acc * scale[o, g]
            out[t, o] = total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def matvec_int4(x_even, x_odd, x_group_sums, packed, scale, out):
    """x_even/x_odd [T, I/2] (columns 0,2,4.. / 1,3,5.. of x), x_group_sums [T, N] (sum of x over
    each group), packed [O, I/2] uint8, scale [O, N] float32 -> out [T, O].

    Byte k of a row holds signed nibbles for columns 2k (high) and 2k+1 (low). Flipping bit 3 of
    a nibble (xor 8) maps its signed value s in -8..7 to s + 8 in 0..15, so both nibbles of
    ``byte ^ 0x88`` widen to float without a branch, and the +8 is taken back once per group:
    sum((s + 8) * x) - 8 * sum(x).
    """
    T, half = x_even.shape
    n_groups = scale.shape[1]
    group = half // n_groups  # packed bytes per group
    for o in prange(packed.shape[0]):
        for t in range(T):
            total = np.float32(0.0)
            for g in range(n_groups):
                acc = np.float32(0.0)
                for k in range(g * group, (g + 1) * group):
                    b = packed[o, k] ^ np.uint8(0x88)
                    acc += np.float32(b >> 4) * x_even[t, k] + np.float32(b & 15) * x_odd[t, k]
                total += (acc - np.float32(8.0) * x_group_sums[t, g]) * scale[o, g]
            out[t, o] = total
