"""The exercises as taught: for each, the explanation a student reads (markdown), the line that
starts the function and a model solution's body. One source for the exercise notebooks
(notebooks/exercises/make_notebooks.py) and the classroom assignments (glm_numpy.classroom).

The function names are the exercise names (glm_numpy.exercises.EXERCISES), so a student's
functions can also be pasted into one .py file and graded with ``glm-numpy check FILE.py``.
"""

# (name, explanation in markdown, signature line, solution body)
LESSONS = [
    (
        "embedding",
        """Turn token ids into vectors: row `ids[t]` of the embedding table is token t's vector.
ChatGLM2 adds nothing else — no scaling by sqrt(D), no position embedding (positions enter later,
through rotary).

Shapes: `ids [T]` int, `table [V, D]` float32 → `[T, D]` float32.""",
        "def embedding(ids, table):",
        """    return table[ids]  # [T, D]: one row per id""",
    ),
    (
        "rms_norm",
        """RMSNorm scales each row (token) to unit root-mean-square, then multiplies by a learned
weight:

    y = x / sqrt(mean(x²) + eps) * weight

The mean is over the D features of the row. Unlike LayerNorm nothing is subtracted, and eps sits
**inside** the square root.

Shapes: `x [T, D]`, `weight [D]`, `eps` a float → `[T, D]` float32.""",
        "def rms_norm(x, weight, eps):",
        """    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [T, 1]
    return x / np.sqrt(mean_square + eps) * weight  # [T, D]""",
    ),
    (
        "rotary",
        """Rotary position embedding turns pairs of channels by an angle that grows with the
position, so that q·k depends on how far apart two tokens are.

ChatGLM2's version, for a head of Dh channels and R = Dh/2:
- only the first R channels rotate; channels R..Dh-1 pass through unchanged;
- pairs are **interleaved neighbours** (2i, 2i+1) for i = 0..R/2-1 (not "rotate half");
- pair i at position p turns by p·θᵢ with θᵢ = 10000^(-2i/R):

      out[2i]   = x[2i]·cos − x[2i+1]·sin
      out[2i+1] = x[2i+1]·cos + x[2i]·sin

Shapes: `x [T, N, Dh]` (N heads), `positions [T]` int → `[T, N, Dh]` float32.""",
        "def rotary(x, positions):",
        """    T, N, Dh = x.shape
    R = Dh // 2
    theta = 10000.0 ** (-np.arange(0, R, 2) / R)  # [R/2]
    angles = positions[:, None] * theta  # [T, R/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]  # [T, 1, R/2]
    even, odd = x[..., 0:R:2], x[..., 1:R:2]  # [T, N, R/2] each
    out = x.copy()  # the channels R..Dh-1 stay as they are
    out[..., 0:R:2] = even * cos - odd * sin
    out[..., 1:R:2] = odd * cos + even * sin
    return out""",
    ),
    (
        "attention",
        """Grouped-query causal attention. H query heads share G key/value groups in contiguous
blocks: head h reads group h // (H/G) (ChatGLM2: 32 heads, 2 groups).

For each head: scores = q·k / sqrt(Dh), masked so that a query sees only keys at its own position
or earlier, softmax over the keys, then the weighted sum of the values. The T queries are the
**last** T of the S positions (with a KV cache, S - T keys come before them), so query t sits at
position S - T + t. Subtract each row's maximum before exp(): large scores must not overflow.

Shapes: `q [T, H, Dh]`, `k [S, G, Dh]`, `v [S, G, Dh]` → `[T, H, Dh]` float32.""",
        "def attention(q, k, v):",
        """    T, H, Dh = q.shape
    S, G, _ = k.shape
    k = np.repeat(k, H // G, axis=1)  # [S, H, Dh]: head h reads group h // (H/G)
    v = np.repeat(v, H // G, axis=1)  # [S, H, Dh]
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)  # [H, T, S]
    query_position = np.arange(S - T, S)[:, None]  # [T, 1]
    allowed = np.arange(S)[None, :] <= query_position  # [T, S]
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))  # [H, T, S]
    probs = weights / weights.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).astype(np.float32)  # [T, H, Dh]""",
    ),
    (
        "swiglu",
        """ChatGLM2's MLP. One matrix, `dense_h_to_4h` [2F, D], makes 2F channels; the **first** F
are the gate, the second F the "up" projection. Then

    out = (silu(gate) * up) @ w_4h_to_h.T,   silu(z) = z * sigmoid(z)

Weights are stored as torch stores them, [out, in], so a linear layer is `x @ w.T`.

Shapes: `x [T, D]`, `w_h_to_4h [2F, D]`, `w_4h_to_h [D, F]` → `[T, D]` float32.""",
        "def swiglu(x, w_h_to_4h, w_4h_to_h):",
        """    u = x @ w_h_to_4h.T  # [T, 2F]
    F = u.shape[-1] // 2
    gate, up = u[:, :F], u[:, F:]  # [T, F] each
    silu = gate / (1 + np.exp(-gate))
    return (silu * up) @ w_4h_to_h.T  # [T, D]""",
    ),
    (
        "lm_head",
        """The output layer turns each final hidden state into one score (logit) per vocabulary
entry. ChatGLM2's output layer is its own matrix (not the embedding table), stored [V, D].
It returns the raw logits: sampling applies its softmax later.

Shapes: `x [T, D]`, `w [V, D]` → `[T, V]` float32.""",
        "def lm_head(x, w):",
        """    return x @ w.T  # [T, V]""",
    ),
    (
        "block",
        """One whole ChatGLM2 transformer block, pre-norm with two residuals:

    x1  = x + dense(attention(rotary(q), rotary(k), v)),   q|k|v = input_layernorm(x) @ Wqkv.T + b
    out = x1 + swiglu(post_attention_layernorm(x1))

The weights come as a dict under the official short names:

| name | shape |
| --- | --- |
| `input_layernorm.weight` | [D] |
| `self_attention.query_key_value.weight` | [(H+2G)·Dh, D]: rows q (H·Dh), k (G·Dh), v (G·Dh) |
| `self_attention.query_key_value.bias` | [(H + 2G)·Dh] |
| `self_attention.dense.weight` | [D, H·Dh] |
| `post_attention_layernorm.weight` | [D] |
| `mlp.dense_h_to_4h.weight` | [2F, D] — rows: gate, then up |
| `mlp.dense_4h_to_h.weight` | [D, F] |

Dh = `weights["self_attention.dense.weight"].shape[1] // num_heads`. Use the package's layers
(`glm_numpy.layers`: rms_norm, rotary_table + apply_rotary, attention, swiglu) or your own from
the earlier exercises: this exercise is about putting them together.

Shapes: `x [T, D]`, `positions [T]` int, `weights` dict, `num_heads` H, `num_kv_groups` G,
`eps` → `[T, D]` float32.""",
        "def block(x, positions, weights, num_heads, num_kv_groups, eps):",
        """    from glm_numpy import layers

    H, G, T = num_heads, num_kv_groups, x.shape[0]
    Dh = weights["self_attention.dense.weight"].shape[1] // H
    a = layers.rms_norm(x, weights["input_layernorm.weight"], eps)  # [T, D]
    qkv = (a @ weights["self_attention.query_key_value.weight"].T
           + weights["self_attention.query_key_value.bias"])  # [T, (H+2G)*Dh]
    q = qkv[:, : H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh : (H + G) * Dh].reshape(T, G, Dh)
    v = qkv[:, (H + G) * Dh :].reshape(T, G, Dh)
    cos, sin = layers.rotary_table(positions, Dh // 2)  # [T, Dh/4] each
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    context = layers.attention(q, k, v).reshape(T, H * Dh)  # heads side by side
    x1 = x + context @ weights["self_attention.dense.weight"].T  # [T, D]
    m = layers.rms_norm(x1, weights["post_attention_layernorm.weight"], eps)
    mlp = layers.swiglu(m, weights["mlp.dense_h_to_4h.weight"],
                        weights["mlp.dense_4h_to_h.weight"])
    return x1 + mlp  # [T, D]""",
    ),
    (
        "kv_cache_step",
        """Generating one token at a time, a model keeps the keys and values of every earlier token
in a cache instead of recomputing them. One decode step for one layer:

1. the new token sits at position S, the number of tokens already cached;
2. rotate q and k at that position (rotary, as in the rotary exercise);
3. append the **rotated** k, and v, to the cache — cached keys are never rotated again;
4. the query attends to all S + 1 keys.

Shapes: `q [1, H, Dh]`, `k [1, G, Dh]`, `v [1, G, Dh]` (straight from the projection, not yet
rotated), `cache_k [S, G, Dh]`, `cache_v [S, G, Dh]` → a tuple
`(out [1, H, Dh], cache_k [S+1, G, Dh], cache_v [S+1, G, Dh])`. You may use `glm_numpy.layers`
(rotary_table, apply_rotary, attention) or your own functions.""",
        "def kv_cache_step(q, k, v, cache_k, cache_v):",
        """    from glm_numpy import layers

    S, G, Dh = cache_k.shape
    cos, sin = layers.rotary_table(np.array([S]), Dh // 2)  # the new token is at position S
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    cache_k = np.concatenate([cache_k, k])  # [S+1, G, Dh]: appended after rotary
    cache_v = np.concatenate([cache_v, v])
    return layers.attention(q, cache_k, cache_v), cache_k, cache_v""",
    ),
    (
        "top_p",
        """Top-p (nucleus) sampling draws the next token only from the most likely tokens whose
probabilities add up to at least p: sort by probability, most likely first, and keep tokens until
the running total reaches p — including the token that reaches it, so at least one token is
always kept. p = 1 keeps everything.

Shapes: `logits [V]`, `p` in (0, 1] → the set of kept token ids (a Python set of ints).""",
        "def top_p(logits, p):",
        """    probs = np.exp(logits - logits.max())  # no overflow, whatever the logits
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")  # most likely first
    total = np.cumsum(probs[order])
    kept = int(np.searchsorted(total, p)) + 1  # up to and including the token reaching p
    return set(order[:kept].tolist())""",
    ),
]


def lesson(name: str) -> tuple[str, str, str, str]:
    """-> (name, explanation, signature line, solution body) of the exercise ``name``."""
    for entry in LESSONS:
        if entry[0] == name:
            return entry
    raise KeyError(f"no lesson for exercise {name!r}")


def notebook_document(cells: list[dict]) -> dict:
    """cells -> a Jupyter notebook (nbformat 4.5), as the exercise notebooks and the classroom's
    assignments are written."""
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
