"""Known wrong answers: the mistakes students really make, each as a function with the student's
signature and a diagnosis in plain words.

When a student's output is wrong, ``diagnose`` runs these on the same cases; a mistake whose
output equals the student's on every case names the likely bug. Wherever possible a mistake is the
reference itself fed altered inputs (a permutation of channels, swapped weight halves, a scaled
query, another mask), so that it cannot drift from the real layer; the few that change a formula
(eps outside the root, an unstabilised softmax…) spell out only the wrong step.

Shape legend: T tokens · S cached + new · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from glm_numpy import layers
from glm_numpy.exercises import references as ref
from glm_numpy.generation import softmax as softmax_1d
from glm_numpy.layers.swiglu import swiglu_act


@dataclasses.dataclass(frozen=True)
class Mistake:
    diagnosis: str
    function: Callable


def _width(x: np.ndarray) -> int:
    """The last axis: D of x [T, D], Dh of x [T, N, Dh]."""
    return x.shape[-1]


# ------------------------------------------------------------------------------- embedding
def _embedding_mistakes() -> list[Mistake]:
    return [
        Mistake(
            "the rows are multiplied by sqrt(D); ChatGLM2 uses the embedding rows as they are "
            "(no scaling, unlike some other transformers)",
            lambda ids, table: ref.embedding(ids, table) * np.float32(np.sqrt(table.shape[1])),
        ),
        Mistake(
            "the ids are off by one (row id - 1 was taken): ids index rows from 0",
            # np.roll(table, 1)[i] = table[i - 1], with id 0 wrapping to the last row as
            # table[-1] does
            lambda ids, table: ref.embedding(ids, np.roll(table, 1, axis=0)),
        ),
        Mistake(
            "the ids are ignored: the first T rows of the table were returned, not rows ids[t]",
            lambda ids, table: table[: len(ids)].astype(np.float32),
        ),
        Mistake(
            "the ids are off by one (row id + 1 was taken): ids index rows from 0, directly",
            lambda ids, table: ref.embedding(ids, np.roll(table, -1, axis=0)),
        ),
        Mistake(
            "the rows are divided by sqrt(D); ChatGLM2 uses the embedding rows as they are",
            lambda ids, table: ref.embedding(ids, table) / np.float32(np.sqrt(table.shape[1])),
        ),
        Mistake(
            "the rows were rounded to float16 on the way: a lookup copies the float32 rows exactly",
            lambda ids, table: ref.embedding(ids, table.astype(np.float16).astype(np.float32)),
        ),
    ]


# ------------------------------------------------------------------------------- rms_norm
def _eps_outside_root(x, weight, eps):
    """x [T, D] -> x / (sqrt(mean(x^2)) + eps) * weight: eps added after the square root."""
    root = np.sqrt(np.mean(x * x, axis=-1, keepdims=True))  # [T, 1]
    return (x / (root + np.float32(eps)) * weight).astype(np.float32)


def _rms_norm_mistakes() -> list[Mistake]:
    eps_ignored = (
        "the eps argument is ignored (a fixed value is used instead): use the eps you are given"
    )
    return [
        Mistake(
            "eps is missing: x / sqrt(mean(x²)) divides by zero for a row of zeros and is "
            "wrong for tiny rows; eps belongs inside the root: x / sqrt(mean(x²) + eps)",
            lambda x, w, eps: ref.rms_norm(x, w, 0.0),
        ),
        Mistake(
            "eps is outside the square root: x / (sqrt(mean(x²)) + eps); it belongs inside: "
            "x / sqrt(mean(x²) + eps)",
            _eps_outside_root,
        ),
        Mistake(
            "the mean is subtracted (that is LayerNorm); RMSNorm only divides by the root mean "
            "square: x / sqrt(mean(x²) + eps) * weight, no centring",
            lambda x, w, eps: ref.rms_norm(x - x.mean(axis=-1, keepdims=True), w, eps),
        ),
        Mistake(
            "np.var / np.std was used: they subtract the mean first; RMSNorm needs mean(x²) itself",
            lambda x, w, eps: (x / np.sqrt(x.var(axis=-1, keepdims=True) + eps) * w).astype(
                np.float32
            ),
        ),
        Mistake(
            "the weight is not applied: multiply the normalised rows by weight [D]",
            lambda x, w, eps: ref.rms_norm(x, np.ones_like(w), eps),
        ),
        Mistake(
            "the square root is missing: divide by sqrt(mean(x²) + eps), not by mean(x²) + eps",
            lambda x, w, eps: (x / (np.mean(x * x, axis=-1, keepdims=True) + eps) * w).astype(
                np.float32
            ),
        ),
        Mistake(
            "the sum of squares was used instead of their mean: divide by D (np.mean)",
            lambda x, w, eps: ref.rms_norm(x, w, eps / _width(x)) / np.float32(np.sqrt(_width(x))),
        ),
        Mistake(
            "the statistics are taken over the wrong axis (over tokens): each row (token) is "
            "normalised over its own D features, axis=-1",
            lambda x, w, eps: (x / np.sqrt(np.mean(x * x, axis=0, keepdims=True) + eps) * w).astype(
                np.float32
            ),
        ),
        Mistake(eps_ignored, lambda x, w, eps: ref.rms_norm(x, w, 1e-5)),
        Mistake(eps_ignored, lambda x, w, eps: ref.rms_norm(x, w, 1e-6)),
        Mistake(
            "the weight is added instead of multiplied: x / sqrt(mean(x²) + eps) * weight",
            lambda x, w, eps: ref.rms_norm(x, np.ones_like(w), eps) + w,
        ),
        Mistake(
            "the weight is applied before normalising, so the root mean square is taken of "
            "x·weight: normalise x itself, then multiply by weight",
            lambda x, w, eps: ref.rms_norm(x * w, np.ones_like(w), eps),
        ),
        Mistake(
            "mean(x²) is taken over the whole array (np.mean without axis=-1): each row (token) "
            "is normalised by its own mean square",
            lambda x, w, eps: (x / np.sqrt(np.mean(x * x) + eps) * w).astype(np.float32),
        ),
        Mistake(
            "x is multiplied by the root instead of divided by it: y = x / sqrt(mean(x²) + eps) "
            "* weight",
            lambda x, w, eps: (
                x * np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
            ).astype(np.float32),
        ),
    ]


# ------------------------------------------------------------------------------- rotary
def rotate_half_permutation(Dh: int, R: int) -> np.ndarray:
    """[Dh] channel order that turns "rotate half" into interleaved pairs: channel j of the first
    R/2 and channel j + R/2 become the adjacent pair (2j, 2j+1); channels >= R stay."""
    half = R // 2
    order = np.arange(Dh)
    order[0:R:2], order[1:R:2] = np.arange(half), np.arange(half, R)
    return order


def _rotary_with(x, positions, rotary_dim, base=ref.ROTARY_BASE, rotate_half=False, fp16=False):
    """x [T, N, Dh] -> [T, N, Dh]: the reference's rotary with one thing changed: how many
    channels rotate, the base, the NeoX "rotate half" pairing, or a float16 table."""
    cos, sin = layers.rotary_table(positions, rotary_dim, base, reference_fp16=fp16)
    if not rotate_half:
        return layers.apply_rotary(x, cos, sin)
    order = rotate_half_permutation(x.shape[-1], rotary_dim)
    out = np.empty_like(x)
    out[..., order] = layers.apply_rotary(x[..., order], cos, sin)  # pairs (j, j+R/2)
    return out


def _rotary_mistakes() -> list[Mistake]:
    return [
        Mistake(
            'the pairs are (i, i + R/2) — "rotate half", the NeoX / ChatGLM-6B v1 layout; '
            "ChatGLM2 rotates interleaved neighbours (2i, 2i+1)",
            lambda x, p: _rotary_with(x, p, _width(x) // 2, rotate_half=True),
        ),
        Mistake(
            'all Dh channels rotate as "rotate half" pairs; ChatGLM2 rotates only the first '
            "R = Dh/2 channels, as interleaved pairs (2i, 2i+1), and passes the rest through",
            lambda x, p: _rotary_with(x, p, _width(x), rotate_half=True),
        ),
        Mistake(
            "all Dh channels are rotated; only the first R = Dh/2 rotate, channels R..Dh-1 pass "
            "through unchanged",
            lambda x, p: _rotary_with(x, p, _width(x)),
        ),
        Mistake(
            "the last R channels are rotated instead of the first R",
            _last_half_rotated,
        ),
        Mistake(
            "the frequencies use the head dim: theta_i = 10000^(-2i/Dh); the exponent divides by "
            "the rotated dims R = Dh/2: theta_i = 10000^(-2i/R)",
            lambda x, p: _frequencies_over_head_dim(x, p),
        ),
        Mistake(
            "the frequency exponent has the wrong sign: theta_i = 10000^(+2i/R); it must be "
            "10000^(-2i/R) (frequencies fall from 1 down to about 1/10000)",
            lambda x, p: _rotary_with(x, p, _width(x) // 2, base=1.0 / ref.ROTARY_BASE),
        ),
        Mistake(
            "the wrong base: ChatGLM2 uses 10000",
            lambda x, p: _rotary_with(x, p, _width(x) // 2, base=1000.0),
        ),
        Mistake(
            "the positions argument is ignored (0..T-1 was used); token t sits at positions[t]",
            lambda x, p: ref.rotary(x, np.arange(len(p))),
        ),
        Mistake(
            "the rotation goes the wrong way (the sign of sin is flipped): "
            "out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = x[2i+1]·cos + x[2i]·sin",
            lambda x, p: ref.rotary(x, -np.asarray(p)),
        ),
        Mistake(
            "the angles are computed in float16, which cannot hold large positions exactly "
            "(above 2048) nor the angles precisely: compute the table in float32 or float64",
            lambda x, p: _rotary_with(x, p, _width(x) // 2, fp16=True),
        ),
        Mistake(
            "the positions are off by one (positions + 1): token t sits at positions[t], "
            "counting from 0",
            lambda x, p: ref.rotary(x, np.asarray(p) + 1),
        ),
        Mistake(
            "cos and sin are exchanged: out[2i] = x[2i]·cos − x[2i+1]·sin, out[2i+1] = "
            "x[2i+1]·cos + x[2i]·sin",
            _cos_sin_exchanged,
        ),
        Mistake(
            "the even channels are overwritten in place before out[2i+1] reads them: "
            "out[2i+1] = x[2i+1]·cos + x[2i]·sin needs the ORIGINAL x[2i] (keep a copy)",
            _rotated_in_place,
        ),
        Mistake(
            "the pass-through channels R..Dh-1 are zeros (the output started as np.zeros_like): "
            "they must be copied from x unchanged",
            lambda x, p: np.concatenate(
                [ref.rotary(x, p)[..., : _width(x) // 2], np.zeros_like(x[..., _width(x) // 2 :])],
                axis=-1,
            ),
        ),
    ]


def _last_half_rotated(x, positions):
    """x [T, N, Dh]: channels R..Dh-1 rotated as interleaved pairs, 0..R-1 passed through."""
    R = _width(x) // 2
    return np.concatenate([x[..., :R], _rotary_with(x[..., R:], positions, R)], axis=-1)


def _cos_sin_exchanged(x, positions):
    """x [T, N, Dh]: each pair turned by 90° minus its angle (cos and sin swapped)."""
    cos, sin = layers.rotary_table(positions, _width(x) // 2, ref.ROTARY_BASE)
    return layers.apply_rotary(x, sin, cos)


def _rotated_in_place(x, positions):
    """x [T, N, Dh]: out[2i] right, out[2i+1] computed from the already-rotated out[2i]."""
    cos, sin = layers.rotary_table(positions, _width(x) // 2, ref.ROTARY_BASE)  # [T, R/2]
    c, s = cos[:, None, :], sin[:, None, :]
    R = _width(x) // 2
    out = ref.rotary(x, positions)
    out[..., 1:R:2] = x[..., 1:R:2] * c + out[..., 0:R:2] * s
    return out


def _frequencies_over_head_dim(x, positions):
    """theta_i = base^(-2i/Dh) = the first R/2 frequencies of a table built for 2R channels."""
    R = x.shape[-1] // 2
    cos, sin = layers.rotary_table(positions, 2 * R, ref.ROTARY_BASE)  # [T, R] each
    return layers.apply_rotary(x, cos[:, : R // 2], sin[:, : R // 2])


# ------------------------------------------------------------------------------- attention
def _with_mask(q, k, v, allowed, fill=None):
    """Attention with a given mask; fill=None masks with -inf like the reference, a number masks
    with that value (what a student writing scores[~allowed] = -1e9 gets)."""
    if fill is None:
        return layers.attention(q, k, v, allowed)
    scores = np.where(allowed, layers.attention_scores(q, k), np.float32(fill))  # [H, T, S]
    probs = layers.masked_softmax(scores, np.ones_like(allowed))
    return layers.attend(probs, v)


def _positions_of_queries(T, S):
    """-> (query positions [T, 1], key positions [1, S])"""
    return np.arange(S - T, S)[:, None], np.arange(S)[None, :]


def _unstabilised(q, k, v):
    """softmax computed as exp(scores) / sum without subtracting the row maximum."""
    T, S = q.shape[0], k.shape[0]
    scores = layers.attention_scores(q, k)  # [H, T, S]
    with np.errstate(all="ignore"):
        weights = np.where(layers.causal_mask(T, S), np.exp(scores), 0)
        probs = weights / weights.sum(axis=-1, keepdims=True)
    return layers.attend(probs.astype(np.float32), v)


def _softmax_over_queries(q, k, v):
    """the softmax normalises each key's column over the queries (axis -2) instead of each row."""
    T, S = q.shape[0], k.shape[0]
    scores = np.where(layers.causal_mask(T, S), layers.attention_scores(q, k), -np.inf)
    probs = layers.masked_softmax(np.swapaxes(scores, -1, -2), np.ones((S, T), bool))
    return layers.attend(np.nan_to_num(np.swapaxes(probs, -1, -2)), v)


def _mask_after_softmax(q, k, v):
    """softmax over every key, then the future keys' probabilities set to 0 (rows sum < 1)."""
    T, S = q.shape[0], k.shape[0]
    probs = layers.masked_softmax(layers.attention_scores(q, k), np.ones((T, S), bool))
    return layers.attend(probs * layers.causal_mask(T, S), v)


def _round_robin(q, k, v):
    """head h reads group h % G: run the reference on the heads sorted by h % G, put them back."""
    H, G = q.shape[1], k.shape[1]
    order = np.argsort(np.arange(H) % G, kind="stable")
    out = np.empty_like(q)
    out[:, order] = layers.attention(q[:, order], k, v)
    return out


def _attention_mistakes() -> list[Mistake]:
    def mask(q, k, rule):
        query_pos, key_pos = _positions_of_queries(q.shape[0], k.shape[0])
        return rule(query_pos, key_pos)

    excludes_self = (
        "the mask is off by one: each query must also see its own position (keys at positions "
        "<= the query's, not <)"
    )
    return [
        Mistake(
            "heads are mapped to kv groups round-robin (head h -> group h % G, e.g. np.tile); "
            "ChatGLM2 uses contiguous blocks: head h -> group h // (H/G) (np.repeat on the group "
            "axis)",
            _round_robin,
        ),
        Mistake(
            "the scores are scaled by 1/Dh; the scale is 1/sqrt(Dh)",
            lambda q, k, v: layers.attention(q / np.float32(np.sqrt(q.shape[-1])), k, v),
        ),
        Mistake(
            "the scores are not scaled; divide q·k by sqrt(Dh)",
            lambda q, k, v: layers.attention(q * np.float32(np.sqrt(q.shape[-1])), k, v),
        ),
        Mistake(
            "the softmax is not stabilised: exp() of large scores overflows to inf and gives "
            "NaN; subtract each row's maximum before exp() (it does not change the result)",
            _unstabilised,
        ),
        Mistake(
            "the causal mask is missing: a query may not look at later positions",
            lambda q, k, v: _with_mask(q, k, v, np.ones((q.shape[0], k.shape[0]), bool)),
        ),
        Mistake(excludes_self, lambda q, k, v: _with_mask(q, k, v, mask(q, k, np.greater))),
        Mistake(
            excludes_self, lambda q, k, v: _with_mask(q, k, v, mask(q, k, np.greater), fill=-1e9)
        ),
        Mistake(
            "the mask is off by one: each query also sees the next position",
            lambda q, k, v: _with_mask(q, k, v, mask(q, k, lambda qp, kp: kp <= qp + 1)),
        ),
        Mistake(
            "the mask treats the T queries as positions 0..T-1 (np.tril(np.ones((T, S)))); "
            "they are the LAST T of the S positions: query t sits at position S - T + t",
            lambda q, k, v: _with_mask(q, k, v, np.tril(np.ones((q.shape[0], k.shape[0]), bool))),
        ),
        Mistake(
            "masked scores are set to 0 (e.g. scores * mask) instead of -inf: exp(0) = 1 still "
            "gives future keys weight",
            lambda q, k, v: _with_mask(q, k, v, mask(q, k, np.greater_equal), fill=0.0),
        ),
        Mistake(
            "the softmax runs over the wrong axis (over queries); each query's row of scores "
            "over the S keys must add up to 1 (axis=-1)",
            _softmax_over_queries,
        ),
        Mistake(
            "the scale is applied after the softmax (the probabilities are divided by sqrt(Dh)); "
            "it belongs to the scores, before the softmax: softmax(q·k / sqrt(Dh))",
            lambda q, k, v: (
                layers.attention(q * np.float32(np.sqrt(q.shape[-1])), k, v)
                / np.float32(np.sqrt(q.shape[-1]))
            ),
        ),
        Mistake(
            "the mask is applied after the softmax (future keys zeroed, the rest not "
            "renormalised): mask the scores with -inf first, then take the softmax",
            _mask_after_softmax,
        ),
        Mistake(
            "the keys are used as values: the output is the weighted sum of v, not of k",
            lambda q, k, v: layers.attention(q, k, k),
        ),
        Mistake(
            "the [H, T, Dh] result is reshaped to [T, H, Dh] instead of transposed: a reshape "
            "keeps the memory order, use .transpose(1, 0, 2) (or einsum '...->thd')",
            lambda q, k, v: np.ascontiguousarray(
                layers.attention(q, k, v).transpose(1, 0, 2)
            ).reshape(q.shape),
        ),
    ]


# ------------------------------------------------------------------------------- swiglu
def _swiglu_with(activation, x, w_h_to_4h, w_4h_to_h):
    """The reference MLP with another function of (gate, up) in place of silu(gate) * up."""
    gate, up, _ = swiglu_act(layers.linear(x, w_h_to_4h))  # [T, F] each
    return layers.linear(activation(gate, up).astype(np.float32), w_4h_to_h)


def _gelu_tanh(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _swiglu_mistakes() -> list[Mistake]:
    gelu = "GELU is used instead of SiLU: the gate goes through silu(z) = z * sigmoid(z)"
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731

    def halves_swapped(w):
        return np.concatenate(np.split(w, 2)[::-1])  # [up rows; gate rows]

    return [
        Mistake(
            "gate and up are swapped: the FIRST half of dense_h_to_4h's output is the gate "
            "(through silu), the second half is up",
            lambda x, w1, w2: ref.swiglu(x, halves_swapped(w1), w2),
        ),
        Mistake(gelu, lambda x, w1, w2: _swiglu_with(lambda g, u: _gelu_tanh(g) * u, x, w1, w2)),
        Mistake(
            gelu,
            lambda x, w1, w2: _swiglu_with(
                lambda g, u: 0.5 * g * (1 + _erf(g / np.sqrt(2))) * u, x, w1, w2
            ),
        ),
        Mistake(
            "ReLU is used instead of SiLU: the gate goes through silu(z) = z * sigmoid(z)",
            lambda x, w1, w2: _swiglu_with(lambda g, u: np.maximum(g, 0) * u, x, w1, w2),
        ),
        Mistake(
            "sigmoid(gate) is used instead of silu(gate) = gate * sigmoid(gate)",
            lambda x, w1, w2: _swiglu_with(lambda g, u: sigmoid(g) * u, x, w1, w2),
        ),
        Mistake(
            "the gate has no activation: it is silu(gate) * up",
            lambda x, w1, w2: _swiglu_with(lambda g, u: g * u, x, w1, w2),
        ),
        Mistake(
            "silu is applied after the product: it is silu(gate) * up, not silu(gate * up)",
            lambda x, w1, w2: _swiglu_with(lambda g, u: layers.silu(g * u), x, w1, w2),
        ),
        Mistake(
            "gate and up are taken as interleaved columns (u[:, 0::2], u[:, 1::2]); they are the "
            "two contiguous halves: gate = u[:, :F], up = u[:, F:]",
            lambda x, w1, w2: ref.swiglu(x, np.concatenate([w1[0::2], w1[1::2]]), w2),
        ),
        Mistake(
            "the input x is added to the output: the residual belongs to the block, swiglu "
            "returns the MLP alone",
            lambda x, w1, w2: ref.swiglu(x, w1, w2) + x,
        ),
        Mistake(
            "silu(gate) and up are added; they are multiplied: silu(gate) * up",
            lambda x, w1, w2: _swiglu_with(lambda g, u: layers.silu(g) + u, x, w1, w2),
        ),
        Mistake(
            "up is not used: the hidden activation is silu(gate) * up, not silu(gate) alone",
            lambda x, w1, w2: _swiglu_with(lambda g, u: layers.silu(g), x, w1, w2),
        ),
    ]


# ------------------------------------------------------------------------------- lm_head
def _row_softmax(logits):
    return layers.masked_softmax(logits[None], np.ones(logits.shape, bool))[0]


def _lm_head_mistakes() -> list[Mistake]:
    return [
        Mistake(
            "the weight is used transposed (x @ w): it is stored [V, D] (torch's [out, in]), "
            "so logits = x @ w.T",
            lambda x, w: ref.lm_head(x, w.T),
        ),
        Mistake(
            "a softmax is applied: lm_head returns the raw logits (sampling takes the softmax "
            "later)",
            lambda x, w: _row_softmax(ref.lm_head(x, w)),
        ),
        Mistake(
            "log-softmax is applied: lm_head returns the raw logits",
            lambda x, w: np.log(_row_softmax(ref.lm_head(x, w))),
        ),
        Mistake(
            "the logits are divided by sqrt(D) (the attention's scale borrowed): lm_head "
            "returns x @ w.T unscaled",
            lambda x, w: ref.lm_head(x, w) / np.float32(np.sqrt(x.shape[1])),
        ),
        Mistake(
            "each row's maximum is subtracted (a softmax step borrowed): lm_head returns the raw "
            "logits x @ w.T",
            lambda x, w: ref.lm_head(x, w) - ref.lm_head(x, w).max(axis=-1, keepdims=True),
        ),
        Mistake(
            "x is normalised first (the final RMSNorm borrowed): lm_head gets x already "
            "normalised and returns x @ w.T",
            lambda x, w: ref.lm_head(ref.rms_norm(x, np.ones(x.shape[1], np.float32), 1e-5), w),
        ),
    ]


# ------------------------------------------------------------------------------- block
def _renamed(weights: dict, **changes) -> dict:
    out = dict(weights)
    out.update({name.replace("__", "."): w for name, w in changes.items()})
    return out


def _permute_qkv_rows(
    weights, num_heads, num_kv_groups, head_order=None, channel_order=None, swap_k_v=False
):
    """Weights whose q|k|v rows are rearranged: query heads reordered, the channels of q and k
    permuted within each head, or k and v exchanged. The attention computed from them equals a
    student's attention with the matching bug (see each use)."""
    W = weights["self_attention.query_key_value.weight"]
    b = weights["self_attention.query_key_value.bias"]
    H, G = num_heads, num_kv_groups
    Dh = W.shape[0] // (H + 2 * G)
    rows = np.arange(W.shape[0]).reshape(H + 2 * G, Dh)  # [heads+groups, Dh]
    if channel_order is not None:
        rows[: H + G] = rows[: H + G][:, channel_order]  # q and k only; v is not rotated
    if head_order is not None:
        rows[:H] = rows[:H][head_order]
    if swap_k_v:
        rows[H:] = np.concatenate([rows[H + G :], rows[H : H + G]])
    rows = rows.ravel()
    out = dict(weights)
    out["self_attention.query_key_value.weight"] = W[rows]
    out["self_attention.query_key_value.bias"] = b[rows]
    if head_order is not None:  # the output projection reads the heads in the new order
        dense = weights["self_attention.dense.weight"]
        columns = np.arange(dense.shape[1]).reshape(H, Dh)[head_order].ravel()
        out["self_attention.dense.weight"] = dense[:, columns]
    return out


def _block_with(
    x, positions, weights, H, G, eps, mlp_reads_x=False, mask=True, rotary="qk", scale=True
):
    """One block spelled out with the package's layers, one step changed: the MLP's norm reads x
    instead of x1, no causal mask, rotary on none / on q, k and v, unscaled scores."""
    T = x.shape[0]
    Dh = weights["self_attention.dense.weight"].shape[1] // H
    a = layers.rms_norm(x, weights["input_layernorm.weight"], eps)  # [T, D]
    qkv = layers.linear(
        a,
        weights["self_attention.query_key_value.weight"],
        weights["self_attention.query_key_value.bias"],
    )  # [T, (H+2G)*Dh]
    q = qkv[:, : H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh : (H + G) * Dh].reshape(T, G, Dh)
    v = qkv[:, (H + G) * Dh :].reshape(T, G, Dh)
    cos, sin = layers.rotary_table(positions, Dh // 2)
    if rotary:
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    if rotary == "qkv":
        v = layers.apply_rotary(v, cos, sin)
    if not scale:
        q = (q * np.float32(np.sqrt(Dh))).astype(np.float32)
    allowed = layers.causal_mask(T, T) if mask else np.ones((T, T), bool)
    context = layers.attention(q, k, v, allowed).reshape(T, H * Dh)
    x1 = x + layers.linear(context, weights["self_attention.dense.weight"])
    m = layers.rms_norm(x if mlp_reads_x else x1, weights["post_attention_layernorm.weight"], eps)
    return x1 + layers.swiglu(
        m, weights["mlp.dense_h_to_4h.weight"], weights["mlp.dense_4h_to_h.weight"]
    )


def _block_mistakes() -> list[Mistake]:
    def variant(change):
        def run(x, positions, weights, H, G, eps):
            return ref.block(*change(x, positions, weights, H, G, eps))

        return run

    def round_robin(x, p, w, H, G, eps):
        order = np.argsort(np.arange(H) % G, kind="stable")
        return x, p, _permute_qkv_rows(w, H, G, head_order=order), H, G, eps

    def rotate_half(x, p, w, H, G, eps):
        Dh = w["self_attention.dense.weight"].shape[1] // H
        order = rotate_half_permutation(Dh, Dh // 2)
        return x, p, _permute_qkv_rows(w, H, G, channel_order=order), H, G, eps

    def swap_norms(x, p, w, H, G, eps):
        return (
            x,
            p,
            _renamed(
                w,
                input_layernorm__weight=w["post_attention_layernorm.weight"],
                post_attention_layernorm__weight=w["input_layernorm.weight"],
            ),
            H,
            G,
            eps,
        )

    def no_bias(x, p, w, H, G, eps):
        bias = w["self_attention.query_key_value.bias"]
        return x, p, _renamed(w, **{"self_attention__query_key_value__bias": 0 * bias}), H, G, eps

    def gate_up_swapped(x, p, w, H, G, eps):
        w1 = w["mlp.dense_h_to_4h.weight"]
        swapped = np.concatenate(np.split(w1, 2)[::-1])
        return x, p, _renamed(w, mlp__dense_h_to_4h__weight=swapped), H, G, eps

    return [
        Mistake(
            "the query_key_value bias is not added: qkv = x @ W.T + bias",
            variant(no_bias),
        ),
        Mistake(
            "the two norm weights are swapped: input_layernorm comes before attention, "
            "post_attention_layernorm before the MLP",
            variant(swap_norms),
        ),
        Mistake(
            "gate and up are swapped in the MLP: the FIRST half of dense_h_to_4h's output is the "
            "gate",
            variant(gate_up_swapped),
        ),
        Mistake(
            "heads are mapped to kv groups round-robin (h % G); ChatGLM2 uses blocks: h // (H/G)",
            variant(round_robin),
        ),
        Mistake(
            'rotary uses "rotate half" pairs (i, i + R/2); ChatGLM2 rotates interleaved pairs '
            "(2i, 2i+1) of the first R = Dh/2 channels",
            variant(rotate_half),
        ),
        Mistake(
            "k and v are swapped: the rows of query_key_value are q (H·Dh), then k (G·Dh), then "
            "v (G·Dh)",
            variant(
                lambda x, p, w, H, G, eps: (
                    x,
                    p,
                    _permute_qkv_rows(w, H, G, swap_k_v=True),
                    H,
                    G,
                    eps,
                )
            ),
        ),
        Mistake(
            "post_attention_layernorm is applied to the block's input x; the MLP reads "
            "post_attention_layernorm(x1), x1 = x + attention output",
            lambda *args: _block_with(*args, mlp_reads_x=True),
        ),
        Mistake(
            "the block's attention has no causal mask: a token may not look at later tokens",
            lambda *args: _block_with(*args, mask=False),
        ),
        Mistake(
            "rotary is not applied: q and k are rotated at their positions before attention",
            lambda *args: _block_with(*args, rotary=""),
        ),
        Mistake(
            "rotary is applied to v too: it turns q and k only",
            lambda *args: _block_with(*args, rotary="qkv"),
        ),
        Mistake(
            "the attention scores are not scaled: divide q·k by sqrt(Dh)",
            lambda *args: _block_with(*args, scale=False),
        ),
    ]


# ------------------------------------------------------------------------------- kv_cache_step
def _decode_step(
    q,
    k,
    v,
    cache_k,
    cache_v,
    position_shift=0,
    rotate_q=True,
    store_rotated=True,
    rerotate_cache=False,
    rotate_v=False,
    prepend=False,
    attend_new=True,
    only_key_0=False,
    v_from_k=False,
    keep_old_cache=False,
    round_robin=False,
):
    """One decode step with one of its steps done wrong (each flag names one)."""
    S, _, Dh = cache_k.shape
    cos, sin = layers.rotary_table(np.array([S + position_shift]), Dh // 2)
    q_r, k_r = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    if rotate_v:
        v = layers.apply_rotary(v, cos, sin)
    new_k = k_r if store_rotated else k
    parts_k, parts_v = (
        ([new_k, cache_k], [v, cache_v]) if prepend else ([cache_k, new_k], [cache_v, v])
    )
    if v_from_k:
        parts_v = [cache_v, k]
    keys, values = np.concatenate(parts_k), np.concatenate(parts_v)  # [S+1, G, Dh]
    if rerotate_cache:
        keys = ref.rotary(keys, np.arange(S + 1))
    query = q_r if rotate_q else q
    if only_key_0:  # np.tril(np.ones((1, S+1))): the mask of a first query, not of the last
        out = layers.attention(query, keys, values, np.tril(np.ones((1, S + 1), bool)))
    elif round_robin:
        out = _round_robin(query, keys, values)
    elif attend_new:
        out = layers.attention(query, keys, values)
    else:
        out = layers.attention(query, cache_k, cache_v)
    if keep_old_cache:
        return out, cache_k, cache_v
    return out, keys, values


def _kv_cache_step_mistakes() -> list[Mistake]:
    def step(**flags):
        return lambda q, k, v, ck, cv: _decode_step(q, k, v, ck, cv, **flags)

    before_rotary = (
        "the new key is appended to the cache before rotary: cache the key AFTER rotating it "
        "at its position S, so cached keys never need rotating again"
    )
    return [
        Mistake(before_rotary, step(store_rotated=False)),
        Mistake(
            before_rotary + " (here the whole cache was rotated after appending, so the "
            "earlier keys were rotated twice)",
            step(store_rotated=False, rerotate_cache=True),
        ),
        Mistake(
            "the new token's position is off by one: with S tokens cached it sits at position S "
            "(positions count from 0)",
            step(position_shift=-1),
        ),
        Mistake(
            "the new token's position is off by one: with S tokens cached it sits at position S",
            step(position_shift=1),
        ),
        Mistake(
            "q and k are rotated at position 0 at every step: the new token's position is S, "
            "the number of tokens already cached",
            lambda q, k, v, ck, cv: _decode_step(q, k, v, ck, cv, position_shift=-ck.shape[0]),
        ),
        Mistake(
            "the query is not rotated: rotate q and k at the new position", step(rotate_q=False)
        ),
        Mistake("v is rotated too: rotary applies to q and k only", step(rotate_v=True)),
        Mistake(
            "the new key and value are put at the front of the cache; append them at the end "
            "(slot S)",
            step(prepend=True),
        ),
        Mistake(
            "the query attends only to the old cache: it must also attend to the new token "
            "itself (append first, then attend over all S+1 keys)",
            step(attend_new=False),
        ),
        Mistake(
            "the query sees only key 0: a causal mask built for a first query (np.tril) hides "
            "the rest; the new token is the LAST position and sees all S + 1 keys (no mask "
            "needed)",
            step(only_key_0=True),
        ),
        Mistake(
            "the value cache gets the new k instead of the new v: append v to cache_v",
            step(v_from_k=True),
        ),
        Mistake(
            "the caches are returned as they were given: return them with the new row S "
            "appended (cache_k [S+1, G, Dh], cache_v [S+1, G, Dh])",
            step(keep_old_cache=True),
        ),
        Mistake(
            "heads are mapped to kv groups round-robin (h % G); ChatGLM2 uses blocks: h // (H/G)",
            step(round_robin=True),
        ),
    ]


# ------------------------------------------------------------------------------- top_p
def _nucleus(logits, p, order, mass_of_sorted, include_crossing=True, extra=0):
    """Keep order[:n] for the first n where the cumulative mass reaches p (and `extra` more)."""
    mass = np.cumsum(mass_of_sorted)
    n = int(np.searchsorted(mass, p)) + (1 if include_crossing else 0) + extra
    return {int(i) for i in order[: min(n, len(order))]}


def _top_p_mistakes() -> list[Mistake]:
    def descending(logits):
        return np.argsort(-logits, kind="stable")

    return [
        Mistake(
            "the token that makes the total reach p is left out: keep the smallest set whose "
            "probabilities add up to AT LEAST p (always at least one token)",
            lambda lg, p: _nucleus(
                lg, p, descending(lg), softmax_1d(lg)[descending(lg)], include_crossing=False
            ),
        ),
        Mistake(
            "the logits are summed as if they were probabilities: take softmax(logits) first",
            lambda lg, p: _nucleus(lg, p, descending(lg), lg[descending(lg)]),
        ),
        Mistake(
            "the tokens are taken from the least likely up: sort by probability, most likely first",
            lambda lg, p: _nucleus(
                lg, p, np.argsort(lg, kind="stable"), softmax_1d(lg)[np.argsort(lg, kind="stable")]
            ),
        ),
        Mistake(
            "tokens whose own probability is at least p are kept; top-p keeps the most likely "
            "tokens until their probabilities ADD UP to p",
            lambda lg, p: {int(i) for i in np.flatnonzero(softmax_1d(lg) >= p)},
        ),
        Mistake(
            "one token past the boundary is kept: stop at the token that makes the total reach "
            "p (searchsorted(total, p) + 1 tokens, not + 2)",
            lambda lg, p: _nucleus(lg, p, descending(lg), softmax_1d(lg)[descending(lg)], extra=1),
        ),
        Mistake(
            "the probabilities are not normalised (exp(logits - max) without dividing by the "
            "sum): softmax makes them add up to 1 before the running total",
            lambda lg, p: _nucleus(
                lg, p, descending(lg), np.exp(lg - lg.max())[descending(lg)].astype(np.float64)
            ),
        ),
    ]


MISTAKES: dict[str, Callable[[], list[Mistake]]] = {
    "embedding": _embedding_mistakes,
    "rms_norm": _rms_norm_mistakes,
    "rotary": _rotary_mistakes,
    "attention": _attention_mistakes,
    "swiglu": _swiglu_mistakes,
    "lm_head": _lm_head_mistakes,
    "block": _block_mistakes,
    "kv_cache_step": _kv_cache_step_mistakes,
    "top_p": _top_p_mistakes,
}
