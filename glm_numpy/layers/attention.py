"""Grouped-query attention (spec §3.4 steps 3-4, §3.5).

H query heads share G key/value groups in contiguous blocks: head h reads group h // (H/G)
(ChatGLM2: 32 heads, 2 groups, heads 0-15 -> group 0, 16-31 -> group 1). Every token attends
causally — ChatGLM2 has no bidirectional prefix.
"""

from __future__ import annotations

import numpy as np


def causal_mask(T: int, S: int) -> np.ndarray:
    """-> allowed [T, S] bool: the T new queries are the last T of S positions; query t (at
    position S-T+t) may attend to keys 0..S-T+t."""
    return np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]  # [T, S]


def group_of_heads(H: int, G: int) -> np.ndarray:
    """-> [H] int: the kv group each query head reads (blocks of H/G heads, not round-robin)."""
    return np.arange(H) // (H // G)


def attention_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q [T, H, Dh], k [S, G, Dh] -> scores [H, T, S] = q·k / sqrt(Dh), head h against group
    h // (H/G)."""
    H, Dh = q.shape[1], q.shape[2]
    k_per_head = k[:, group_of_heads(H, k.shape[1]), :]  # [S, H, Dh]: each head's view of its group
    return np.einsum("thd,shd->hts", q, k_per_head) / np.float32(np.sqrt(Dh))  # [H, T, S]


def masked_softmax(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """scores [H, T, S], allowed [T, S] bool -> probs [H, T, S] float32 (0 where not allowed).

    Each row's maximum is subtracted first, so that large scores cannot overflow exp().
    """
    scores = np.where(allowed, scores, -np.inf)  # [H, T, S]
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # masked keys -> 0
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def attend(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """probs [H, T, S], v [S, G, Dh] -> context [T, H, Dh]: each head's weighted sum of values."""
    v_per_head = v[:, group_of_heads(probs.shape[0], v.shape[1]), :]  # [S, H, Dh]
    return np.einsum("hts,shd->thd", probs, v_per_head)  # [T, H, Dh]


def attention_probs(q: np.ndarray, k: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """q [T, H, Dh], k [S, G, Dh], allowed [T, S] bool (default causal) -> probs [H, T, S]."""
    if allowed is None:
        allowed = causal_mask(q.shape[0], k.shape[0])
    return masked_softmax(attention_scores(q, k), allowed)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray | None = None
) -> np.ndarray:
    """q [T, H, Dh], k/v [S, G, Dh] (cache included), allowed [T, S] -> context [T, H, Dh]."""
    return attend(attention_probs(q, k, allowed), v)
