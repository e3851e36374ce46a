"""The right answers: the package's own layers, called with the students' signatures.

Nothing here re-implements the math; each function only adapts arguments (e.g. builds the rotary
table the student's ``rotary`` computes internally) and calls glm_numpy.layers, glm_numpy.model,
glm_numpy.cache or glm_numpy.generation.

Shape legend: T tokens · S cached + new · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab.
"""

from __future__ import annotations

import numpy as np

from glm_numpy import layers, model
from glm_numpy.cache import KVCache
from glm_numpy.config import ChatGLM2Config
from glm_numpy.generation import top_p_filter

ROTARY_BASE = 10000.0


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """ids [T] int, table [V, D] -> [T, D]"""
    return layers.embedding(ids, table)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, D], weight [D] -> [T, D]"""
    return layers.rms_norm(x, weight, eps)


def rotary(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """x [T, N, Dh], positions [T] int -> [T, N, Dh]: the first R = Dh/2 channels rotated as
    interleaved pairs with base 10000, the rest passed through."""
    cos, sin = layers.rotary_table(positions, x.shape[-1] // 2, ROTARY_BASE)  # [T, R/2] each
    return layers.apply_rotary(x, cos, sin)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [T, H, Dh], k/v [S, G, Dh] -> [T, H, Dh], causal, the queries being the last T of S."""
    return layers.attention(q, k, v)


def swiglu(x: np.ndarray, w_h_to_4h: np.ndarray, w_4h_to_h: np.ndarray) -> np.ndarray:
    """x [T, D], w_h_to_4h [2F, D], w_4h_to_h [D, F] -> [T, D]"""
    return layers.swiglu(x, w_h_to_4h, w_4h_to_h)


def lm_head(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [T, D], w [V, D] -> logits [T, V]"""
    return layers.lm_head(x, w)


def block(
    x: np.ndarray,
    positions: np.ndarray,
    weights: dict[str, np.ndarray],
    num_heads: int,
    num_kv_groups: int,
    eps: float,
) -> np.ndarray:
    """x [T, D], positions [T] int (consecutive), weights under the official short names:

        input_layernorm.weight                  [D]
        self_attention.query_key_value.weight   [(H + 2G) * Dh, D]   rows: q | k | v
        self_attention.query_key_value.bias     [(H + 2G) * Dh]
        self_attention.dense.weight             [D, H * Dh]
        post_attention_layernorm.weight         [D]
        mlp.dense_h_to_4h.weight                [2F, D]              rows: gate | up
        mlp.dense_4h_to_h.weight                [D, F]

    -> [T, D]: one ChatGLM2 block, computed by glm_numpy.model.block (the model's own code).
    """
    T, D = x.shape
    qkv_rows, _ = weights["self_attention.query_key_value.weight"].shape
    config = ChatGLM2Config(
        hidden_size=D,
        ffn_hidden_size=weights["mlp.dense_4h_to_h.weight"].shape[1],
        kv_channels=qkv_rows // (num_heads + 2 * num_kv_groups),
        num_attention_heads=num_heads,
        multi_query_attention=True,
        multi_query_group_num=num_kv_groups,
        layernorm_epsilon=eps,
        add_qkv_bias=True,
    )
    return model.block(x, model.layer_weights(weights), config, positions)


def kv_cache_step(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One decode step. q [1, H, Dh], k/v [1, G, Dh] (straight from the projection, not yet
    rotated), cache_k/cache_v [S, G, Dh] (the S earlier tokens, keys already rotated)
    -> (out [1, H, Dh], cache_k [S+1, G, Dh], cache_v [S+1, G, Dh]).

    The new token sits at position S; q and k are rotated there, the rotated key and the value are
    appended, and the query attends to all S+1 keys — the order glm_numpy.model.self_attention uses.
    """
    S, G, Dh = cache_k.shape
    cache = KVCache(num_layers=1, num_kv_groups=G, head_dim=Dh, capacity=S + 1)
    cache.store(0, cache.extend(np.ones(S, dtype=bool)), cache_k, cache_v)
    new_token = np.ones(1, dtype=bool)
    cos, sin = layers.rotary_table(cache.positions_for(new_token), Dh // 2, ROTARY_BASE)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    cache.store(0, cache.extend(new_token), k, v)  # cached after rotary
    keys, values = cache.keys(0), cache.values(0)  # [S+1, G, Dh]
    return layers.attention(q, keys, values), keys.copy(), values.copy()


def top_p(logits: np.ndarray, p: float) -> set[int]:
    """logits [V], 0 < p <= 1 -> the ids top-p sampling may still pick: the smallest set of most
    likely tokens whose probabilities add up to at least p."""
    return {int(i) for i in np.flatnonzero(np.isfinite(top_p_filter(logits, p)))}
