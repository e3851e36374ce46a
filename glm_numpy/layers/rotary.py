"""Rotary position embedding as ChatGLM2 applies it (spec §3.4, §8.1).

Only the first R = Dh/2 channels of each head rotate; the rest pass through unchanged. The
rotated channels form **interleaved pairs** (2i, 2i+1) — not the "rotate half" split of NeoX and
ChatGLM-6B v1 — and pair i turns by the angle position * theta_i, theta_i = base^(-2i/R).
Because a rotation by a and one by b meet as a rotation by a - b, q·k after rotary depends only
on how far apart the two tokens are.

The 32K models stretch this to longer contexts with a config key ``rope_ratio``, which the two
families read differently (docs/family.md): ChatGLM2-6B-32K divides the positions by it
(position interpolation: ``position_divisor``), ChatGLM3-6B-32K multiplies the base by it.
"""

from __future__ import annotations

import numpy as np


def rotary_table(
    positions: np.ndarray,
    rotary_dim: int,
    base: float = 10000.0,
    reference_fp16: bool = False,
    position_divisor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """positions [...T] int -> (cos [...T, R/2], sin [...T, R/2]) float32.

    Pair i at position p turns by (p / position_divisor) * base^(-2i/R).
    Default: exact angles (float64, then rounded once to float32).
    reference_fp16: the table the shipped fp16 model really computes. The official code builds it
    in the model dtype, so theta, the positions and their products are each rounded to float16;
    positions above 2048 are no longer exact and angles drift by up to radians at long context.
    (That is ChatGLM2's modeling code; ChatGLM3's computes theta and the angles in fp32 and
    rounds only the finished table to fp16.)
    """
    positions = np.asarray(positions)
    if reference_fp16:
        half = np.float16
        exponents = np.arange(0, rotary_dim, 2, dtype=half) / half(rotary_dim)  # [R/2]
        theta = half(1.0) / (half(base) ** exponents)  # [R/2], every step rounded to fp16
        scaled = positions.astype(half) / half(position_divisor)  # [T], the division in fp16 too
        angles = scaled[..., None] * theta  # [T, R/2], product rounded to fp16
        angles = angles.astype(np.float32)
        # cos/sin are taken in fp32, then the table itself is stored back in fp16
        return (
            np.cos(angles).astype(half).astype(np.float32),
            np.sin(angles).astype(half).astype(np.float32),
        )
    theta = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)  # [R/2]
    angles = (positions.astype(np.float64) / position_divisor)[..., None] * theta  # [T, R/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, N, Dh] (N heads or kv groups), cos/sin [T, R/2] -> [T, N, Dh] float32.

    Pair i = (x[2i], x[2i+1]) for i < R/2 turns by its angle; channels R..Dh-1 are copied.
    """
    pairs = cos.shape[-1]  # R/2
    rotated = x[..., : 2 * pairs]  # [T, N, R]
    even, odd = rotated[..., 0::2], rotated[..., 1::2]  # [T, N, R/2] each
    c, s = cos[..., None, :], sin[..., None, :]  # [T, 1, R/2]: same angle for every head
    out = np.array(x, dtype=np.float32)  # [T, N, Dh], the pass-through half already in place
    out[..., 0 : 2 * pairs : 2] = even * c - odd * s
    out[..., 1 : 2 * pairs : 2] = odd * c + even * s
    return out
