"""Decode attention over the KV cache in one pass: scores, masked softmax and the weighted sum
of values for each (query, head), without building the [S, H, Dh] per-head copies of the cache
that the readable layers (glm_numpy.layers.attention) make for clarity.

    q [T, H, Dh], keys/values [S, G, Dh] (head h reads group h // (H/G)), allowed [T, S] bool
    -> context [T, H, Dh] = attend(masked_softmax(attention_scores(q, keys), allowed), values)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from glm_numpy.kernels.matvec import FASTMATH


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def attention_context(q, keys, values, allowed, out):
    """Fill out [T, H, Dh] (see the module docstring); each (head, query) pair is one job."""
    T, H, Dh = q.shape
    S, G = keys.shape[0], keys.shape[1]
    heads_per_group = H // G
    inverse_sqrt = np.float32(1.0 / np.sqrt(Dh))
    for job in prange(H * T):
        h, t = job // T, job % T
        g = h // heads_per_group
        weights = np.zeros(S, dtype=np.float32)  # [S]: scores, then unnormalised probabilities
        top = -np.inf
        for s in range(S):
            if allowed[t, s]:
                dot = np.float32(0.0)
                for d in range(Dh):
                    dot += q[t, h, d] * keys[s, g, d]
                weights[s] = dot * inverse_sqrt
                top = max(top, weights[s])
        total = np.float32(0.0)
        for s in range(S):
            if allowed[t, s]:  # subtracting the maximum keeps exp() from overflowing
                weights[s] = np.exp(weights[s] - top)
                total += weights[s]
            else:
                weights[s] = 0.0
        for d in range(Dh):
            out[t, h, d] = 0.0
        for s in range(S):
            p = weights[s] / total
            if p != 0.0:
                for d in range(Dh):
                    out[t, h, d] += p * values[s, g, d]
