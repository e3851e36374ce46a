"""Write the exercise notebooks: one per exercise, a student version and a solved one.

    python notebooks/exercises/make_notebooks.py

Each notebook has a short explanation, a setup cell, the function cell (tagged "todo": the exact
signature with ``raise NotImplementedError``; in solutions/ tagged "solution": a working body)
and a cell calling ``glm_numpy.exercises.check``. The solved notebooks assert that the check
passes, so running them (``pytest --nbmake notebooks/exercises/solutions``) proves every checker
accepts a correct answer. Edit the exercises here, not in the .ipynb files, and re-run this
script; the notebooks are written without outputs.

The function names are the exercise names, so a student can also paste their functions into one
.py file and grade it with ``glm-numpy check FILE.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, explanation in markdown, signature line, solution body)
EXERCISES = [
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

SETUP = "import numpy as np\n\nfrom glm_numpy.exercises import check"
STILL_TALKS = """# Does your model still talk? The whole default model, your {name} inside it:
from glm_numpy.exercises import run_with

run_with({{"{name}": {name}}}, "床前明月光")"""


def _cell(kind: str, source: str, cell_id: str, tags: list[str] | None = None) -> dict:
    cell = {
        "cell_type": kind,
        "id": cell_id,
        "metadata": {"tags": tags} if tags else {},
        "source": source.splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook(number: int, name: str, text: str, signature: str, body: str, solved: bool) -> dict:
    title = f"# Exercise {number}: `{name}`\n\n"
    if solved:
        function = f"{signature}\n{body}\n"
        checking = (
            f'result = check("{name}", {name})\nprint(result)\nassert result.passed, result.message'
        )
        title = f"# Exercise {number}: `{name}` — solution\n\n"
    else:
        function = f"{signature}\n    # TODO: your code here\n    raise NotImplementedError\n"
        checking = f'check("{name}", {name})'
    cells = [
        _cell(
            "markdown",
            title + text + "\n\nWrite the function, then run the check below: it "
            "tries your function on many inputs and names the likely bug when one is wrong "
            "(for a bug it has no name for, it says where and how your output is wrong).",
            f"{name}-intro",
        ),
        _cell("code", SETUP, f"{name}-setup"),
        _cell("code", function, f"{name}-function", ["solution" if solved else "todo"]),
        _cell("code", checking, f"{name}-check"),
        _cell("code", STILL_TALKS.format(name=name), f"{name}-whole-model"),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


# A bug the checker has no name for, one per exercise: the solved notebook shows what the check
# says about it — where and how the output is wrong, and the step to re-read.
UNCATALOGUED = {
    "embedding": "def embedding(ids, table):\n    return table[(ids + 2) % len(table)]",
    "rms_norm": "def rms_norm(x, weight, eps):\n"
    "    return x / (np.mean(np.abs(x), axis=-1, keepdims=True) + eps) * weight",
    "rotary": "def rotary(x, positions):\n"
    "    R = x.shape[-1] // 2\n"
    "    angles = positions[:, None] * 10000.0 ** (-np.arange(0, R, 2) / R)\n"
    "    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]\n"
    "    even, odd = x[..., 0:R:2], x[..., 1:R:2]\n"
    "    out = x.copy()\n"
    "    out[..., 0:R:2] = even * cos - odd * sin\n"
    "    out[..., 1:R:2] = odd * cos + even * cos  # a typo: cos where sin belongs\n"
    "    return out",
    "attention": "from glm_numpy import layers\n\n\ndef attention(q, k, v):\n"
    "    T = q.shape[0]\n"
    "    return layers.attention(q, k[-T:], v[-T:])  # the cached keys are dropped",
    "swiglu": "def swiglu(x, w_h_to_4h, w_4h_to_h):\n"
    "    u = x @ w_h_to_4h.T\n"
    "    F = u.shape[-1] // 2\n"
    "    gate, up = u[:, :F], u[:, F:]\n"
    "    return (np.log1p(np.exp(gate)) * up) @ w_4h_to_h.T  # softplus, not silu",
    "lm_head": "def lm_head(x, w):\n"
    "    return x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T  # rows of w normalised",
    "block": "from glm_numpy.exercises import references\n\n\n"
    "def block(x, positions, weights, num_heads, num_kv_groups, eps):\n"
    "    out = references.block(x, positions, weights, num_heads, num_kv_groups, eps)\n"
    "    return out - x  # as if the first residual were missing",
    "kv_cache_step": "from glm_numpy import layers\n\n\n"
    "def kv_cache_step(q, k, v, cache_k, cache_v):\n"
    "    S, G, Dh = cache_k.shape\n"
    "    cos, sin = layers.rotary_table(np.array([S]), Dh // 2)\n"
    "    q = layers.apply_rotary(q, cos, sin)\n"
    "    cos, sin = layers.rotary_table(np.array([S + 2]), Dh // 2)\n"
    "    k = layers.apply_rotary(k, cos, sin)\n"
    "    cache_k, cache_v = np.concatenate([cache_k, k]), np.concatenate([cache_v, v])\n"
    "    return layers.attention(q, cache_k, cache_v), cache_k, cache_v",
    "top_p": "def top_p(logits, p):\n"
    "    probs = np.exp(logits - logits.max())\n"
    "    probs /= probs.sum()\n"
    "    order = np.argsort(-probs)\n"
    "    kept = int(np.searchsorted(np.cumsum(probs[order]), p)) + 4  # three too many\n"
    "    return set(order[:kept].tolist())",
}


def uncatalogued_cells(name: str) -> list[dict]:
    """The solved notebook's last cells: a bug the checker has no name for, and its hint."""
    demo = (
        f"{UNCATALOGUED[name]}\n\n\n"
        f'result = check("{name}", {name})\n'
        "print(result.likely_bug)\n"
        'assert not result.passed and "recompute" not in result.likely_bug'
    )
    return [
        _cell(
            "markdown",
            "## A bug the checker has no name for\n\nWhen no known mistake matches, the check "
            "says where the output is wrong (which cases, rows, heads, channels) and how (a "
            "factor, a shift, values moved, an input used in another's place…), and which step "
            "to re-read:",
            f"{name}-uncatalogued-intro",
        ),
        _cell("code", demo, f"{name}-uncatalogued"),
    ]


def main(folder: Path = HERE) -> None:
    """Write the student notebooks into ``folder`` and the solved ones into folder/solutions."""
    (folder / "solutions").mkdir(exist_ok=True)
    for number, (name, text, signature, body) in enumerate(EXERCISES, start=1):
        filename = f"{number:02d}-{name.replace('_', '-')}.ipynb"
        for destination, solved in ((folder, False), (folder / "solutions", True)):
            content = notebook(number, name, text, signature, body, solved)
            if solved:
                content["cells"] += uncatalogued_cells(name)
            (destination / filename).write_text(
                json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )


if __name__ == "__main__":
    main()
