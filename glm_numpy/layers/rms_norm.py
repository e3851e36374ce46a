"""RMSNorm: scale each row to unit root-mean-square, then by a learned weight (spec §3.2)."""

from __future__ import annotations

import numpy as np

from glm_numpy.dtypes import to_float32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [..., D], weight [D] -> [..., D] float32.

    y = x / sqrt(mean(x^2) + eps) * weight. No mean is subtracted (that would be LayerNorm) and
    eps sits inside the square root. Statistics are taken in float32 whatever x's storage.
    """
    x = to_float32(x)  # [..., D]
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return x / np.sqrt(mean_square + np.float32(eps)) * to_float32(weight)  # [..., D]
