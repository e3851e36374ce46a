"""The SwiGLU feed-forward block: silu(gate) * up, then down (spec §3.6)."""

from __future__ import annotations

import numpy as np

from glm_numpy.layers.linear import linear


def silu(z: np.ndarray) -> np.ndarray:
    """silu(z) = z * sigmoid(z), written so that large |z| neither overflows nor gives NaN."""
    return z * (0.5 * (1.0 + np.tanh(0.5 * z)))  # sigmoid(z) = (1 + tanh(z/2)) / 2


def swiglu_act(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u [..., 2F] -> (gate [..., F], up [..., F], silu(gate) * up [..., F]).

    dense_h_to_4h's output holds the gate in its FIRST half and the up projection in its second.
    """
    gate, up = np.split(u, 2, axis=-1)  # [..., F] each
    return gate, up, silu(gate) * up


def swiglu(x: np.ndarray, w_h_to_4h, w_4h_to_h) -> np.ndarray:
    """x [..., D], w_h_to_4h [2F, D], w_4h_to_h [D, F] -> [..., D]."""
    u = linear(x, w_h_to_4h)  # [..., 2F]
    _, _, act = swiglu_act(u)  # [..., F]
    return linear(act, w_4h_to_h)  # [..., D]
