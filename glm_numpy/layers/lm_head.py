"""The output layer: hidden states to logits over the vocabulary (spec §3.7, not tied)."""

from __future__ import annotations

import numpy as np

from glm_numpy.layers.linear import linear


def lm_head(x: np.ndarray, w, last_only: bool = False) -> np.ndarray:
    """x [T, D], w [V, D] -> logits [T, V] float32 ([1, V] with last_only).

    Generation needs only the last position's logits; projecting just that row saves T-1 passes
    over the largest matrix of the model.
    """
    if last_only:
        x = x[..., -1:, :]  # [1, D]
    return linear(x, w)  # [T, V]
