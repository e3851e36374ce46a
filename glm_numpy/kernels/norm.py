"""Fused RMSNorm: one pass for the mean square, one to scale, no temporaries
(glm_numpy.layers.rms_norm is the definition; the numpy version makes five passes and
allocations, which at one token per step cost more than the arithmetic)."""

from __future__ import annotations

import numpy as np
from numba import njit

from glm_numpy.dtypes import to_float32
from glm_numpy.kernels.matvec import FASTMATH


def fused_rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D], weight [D] (any float storage) -> x / sqrt(mean(x^2) + eps) * weight."""
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # [N, D]
    out = np.empty_like(rows)
    rms_norm_rows(rows, np.ascontiguousarray(to_float32(weight)), np.float32(eps), out)
    return out.reshape(x.shape)


@njit(cache=True, fastmath=FASTMATH)
def rms_norm_rows(x, weight, eps, out):
    """x [N, D] float32, weight [D] float32 -> out [N, D]. One thread: at a few rows, waking
    the thread pool would cost more than the whole norm."""
    N, D = x.shape
    for n in range(N):
        square_sum = np.float32(0.0)
        for d in range(D):
            square_sum += x[n, d] * x[n, d]
        inverse_rms = np.float32(1.0) / np.sqrt(square_sum / np.float32(D) + eps)
        for d in range(D):
            out[n, d] = x[n, d] * inverse_rms * weight[d]
