"""The diagnoses: every catalogued mistake added for issue 24 is named exactly when a student
writes it their own way, and the structural analysis (glm_numpy.exercises.structure) says where
and how an uncatalogued mistake is wrong — each rule with one wrong implementation that triggers
it and one near-miss that must not.

The student functions here are written the way students write them, independently of
glm_numpy.exercises.mistakes.
"""

import functools

import numpy as np
import pytest

from glm_numpy.exercises import EXERCISES, check
from glm_numpy.exercises.structure import structural_hint

RECOMPUTE = "recompute the failing case by hand"


def softmax_rows(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref(name):
    return EXERCISES[name].reference


# ------------------------------------------------------------- students' own implementations
def rms(x, weight, eps, *, normaliser=None, weight_first=False, combine="mul", whole=False):
    if weight_first:
        x = x * weight
    square_mean = np.mean(x**2) if whole else np.mean(x**2, axis=-1, keepdims=True)
    root = np.sqrt(square_mean + eps)
    if normaliser == "multiply":
        y = x * root
    else:
        y = x / root
    if weight_first:
        return y
    return y + weight if combine == "add" else y * weight


def rotary(x, positions, *, offset=0, swap=False, in_place=False, zero_rest=False):
    T, N, Dh = x.shape
    R = Dh // 2
    theta = 1.0 / 10000 ** (np.arange(0, R, 2) / R)
    angle = (positions[:, None] + offset) * theta
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if swap:
        cos, sin = sin, cos
    out = np.zeros_like(x) if zero_rest else x.copy()
    if in_place:
        out[..., 0:R:2] = x[..., 0:R:2] * cos - x[..., 1:R:2] * sin
        out[..., 1:R:2] = x[..., 1:R:2] * cos + out[..., 0:R:2] * sin
        return out
    even, odd = x[..., 0:R:2], x[..., 1:R:2]
    out[..., 0:R:2] = even * cos - odd * sin
    out[..., 1:R:2] = odd * cos + even * sin
    return out


def attention(q, k, v, *, scale_probs=False, mask_probs=False, values=None, reshape=False,
              group=None, only_first=False, swap_kv=False, recent_keys_only=False,
              plain_scores=False, mask_from=0, renormalise=True, head_of_q=None):  # fmt: skip
    T, H, Dh = q.shape
    if head_of_q is not None:  # one head's query for every head
        q = np.repeat(q[:, head_of_q : head_of_q + 1], H, axis=1)
    if recent_keys_only:  # the cached keys before the queries are dropped
        k, v = k[-T:], v[-T:]
    S, G, _ = k.shape
    if swap_kv:
        k, v = v, k
    heads = np.arange(H) // (H // G) if group is None else group(np.arange(H), H, G)
    kh, vh = k[:, heads], (k if values == "k" else v)[:, heads]  # [S, H, Dh]
    scores = np.einsum("thd,shd->hts", q, kh)
    if not scale_probs:
        scores = scores / np.sqrt(Dh)
    query_pos, key_pos = np.arange(S - T, S)[:, None], np.arange(S)[None, :]
    allowed = key_pos == 0 if only_first else (key_pos <= query_pos) & (key_pos >= mask_from)
    if plain_scores:  # no softmax: the masked scores themselves
        probs = np.where(allowed, scores, 0.0)
    elif mask_probs or not renormalise:
        probs = softmax_rows(scores) * allowed
    else:
        probs = softmax_rows(np.where(allowed, scores, -np.inf))
    if scale_probs:
        probs = probs / np.sqrt(Dh)
    out = np.einsum("hts,shd->htd", probs, vh)  # [H, T, Dh]
    out = out.reshape(T, H, Dh) if reshape else out.transpose(1, 0, 2)
    return out.astype(np.float32)


def swiglu(x, w1, w2, *, combine="mul", residual=False, activation=None):
    u = x @ w1.T
    F = u.shape[1] // 2
    gate, up = u[:, :F], u[:, F:]
    act = activation(gate) if activation else gate / (1 + np.exp(-gate))
    h = {"mul": act * up, "add": act + up, "gate_only": act}[combine]
    out = h @ w2.T
    return x + out if residual else out


def kv_step(q, k, v, cache_k, cache_v, *, tril=False, v_gets_k=False, old_caches=False,
            round_robin=False, key_offset=0):  # fmt: skip
    S = cache_k.shape[0]
    q = rotary(q, np.array([S]))
    k_rot = rotary(k, np.array([S + key_offset]))
    keys = np.concatenate([cache_k, k_rot])
    values = np.concatenate([cache_v, k if v_gets_k else v])
    H, G = q.shape[1], keys.shape[1]
    heads = np.arange(H) % G if round_robin else np.arange(H) // (H // G)
    scores = np.einsum("thd,shd->hts", q, keys[:, heads]) / np.sqrt(q.shape[-1])
    if tril:
        scores = np.where(np.tril(np.ones((1, S + 1), bool)), scores, -np.inf)
    out = np.einsum("hts,shd->thd", softmax_rows(scores), values[:, heads]).astype(np.float32)
    if old_caches:
        return out, cache_k, cache_v
    return out, keys, values


def top_p(logits, p, *, extra=0, normalise=True, positions=False, order_fn=None):
    e = np.exp(logits - logits.max())
    probs = e / e.sum() if normalise else e
    order = np.argsort(-probs) if order_fn is None else order_fn(probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1 + extra
    return set(range(n)) if positions else set(order[:n].tolist())


def block(x, positions, weights, H, G, eps, *, mlp_on_x=False, mask=True, rope="qk", scale=True):
    T, D = x.shape
    Dh = weights["self_attention.dense.weight"].shape[1] // H

    def norm(z, w):
        return z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + eps) * w

    a = norm(x, weights["input_layernorm.weight"])
    qkv = a @ weights["self_attention.query_key_value.weight"].T
    qkv = qkv + weights["self_attention.query_key_value.bias"]
    q = qkv[:, : H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh : (H + G) * Dh].reshape(T, G, Dh)
    v = qkv[:, (H + G) * Dh :].reshape(T, G, Dh)
    if rope:
        q, k = rotary(q, positions), rotary(k, positions)
    if rope == "qkv":
        v = rotary(v, positions)
    kh, vh = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
    scores = np.einsum("thd,shd->hts", q, kh) / (np.sqrt(Dh) if scale else 1.0)
    if mask:
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    context = np.einsum("hts,shd->thd", softmax_rows(scores), vh).reshape(T, H * Dh)
    x1 = x + context @ weights["self_attention.dense.weight"].T
    m = norm(x if mlp_on_x else x1, weights["post_attention_layernorm.weight"])
    mlp = swiglu(m, weights["mlp.dense_h_to_4h.weight"], weights["mlp.dense_4h_to_h.weight"])
    return (x1 + mlp).astype(np.float32)


p = functools.partial
# (exercise, student function, a phrase that picks out exactly one catalogued diagnosis)
NEW_CATALOGUED = [
    ("embedding", lambda ids, table: table[(ids + 1) % len(table)], "row id + 1 was taken"),
    ("embedding", lambda ids, table: table[ids] / np.sqrt(table.shape[1]), "divided by sqrt(D)"),
    (
        "embedding",
        lambda ids, table: table[ids].astype(np.float16).astype(np.float32),
        "rounded to float16",
    ),
    ("rms_norm", p(rms, combine="add"), "added instead of multiplied"),
    ("rms_norm", p(rms, weight_first=True), "applied before normalising"),
    ("rms_norm", p(rms, whole=True), "over the whole array"),
    ("rms_norm", p(rms, normaliser="multiply"), "multiplied by the root"),
    ("rotary", p(rotary, offset=1), "positions + 1"),
    ("rotary", p(rotary, swap=True), "cos and sin are exchanged"),
    ("rotary", p(rotary, in_place=True), "overwritten in place"),
    ("rotary", p(rotary, zero_rest=True), "np.zeros_like"),
    ("attention", p(attention, scale_probs=True), "applied after the softmax (the prob"),
    ("attention", p(attention, mask_probs=True), "mask is applied after the softmax"),
    ("attention", p(attention, values="k"), "keys are used as values"),
    ("attention", p(attention, reshape=True), "reshaped to [T, H, Dh] instead of transposed"),
    ("swiglu", p(swiglu, residual=True), "residual belongs to the block"),
    ("swiglu", p(swiglu, combine="add"), "silu(gate) and up are added"),
    ("swiglu", p(swiglu, combine="gate_only"), "up is not used"),
    ("lm_head", lambda x, w: x @ w.T / np.sqrt(x.shape[1]), "attention's scale borrowed"),
    (
        "lm_head",
        lambda x, w: (x @ w.T) - (x @ w.T).max(axis=1, keepdims=True),
        "maximum is subtracted",
    ),
    (
        "lm_head",
        lambda x, w: (x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-6)) @ w.T,
        "final RMSNorm borrowed",
    ),
    ("block", p(block, mlp_on_x=True), "applied to the block's input x"),
    ("block", p(block, mask=False), "block's attention has no causal mask"),
    ("block", p(block, rope=""), "rotary is not applied"),
    ("block", p(block, rope="qkv"), "rotary is applied to v too"),
    ("block", p(block, scale=False), "attention scores are not scaled"),
    ("kv_cache_step", p(kv_step, tril=True), "the query sees only key 0"),
    ("kv_cache_step", p(kv_step, v_gets_k=True), "value cache gets the new k"),
    ("kv_cache_step", p(kv_step, old_caches=True), "returned as they were given"),
    ("kv_cache_step", p(kv_step, round_robin=True), "round-robin"),
    ("top_p", p(top_p, extra=1), "one token past the boundary"),
    ("top_p", p(top_p, normalise=False), "not normalised"),
]


@pytest.mark.parametrize(
    "name, student, phrase", NEW_CATALOGUED, ids=[f"{n}-{d[:28]}" for n, _, d in NEW_CATALOGUED]
)
def test_a_new_catalogued_mistake_gets_exactly_its_diagnosis(name, student, phrase):
    (diagnosis,) = {m.diagnosis for m in EXERCISES[name].mistakes() if phrase in m.diagnosis}
    with np.errstate(all="ignore"):
        result = check(name, student)
    assert not result.passed
    assert result.likely_bug == diagnosis, result.message


# ------------------------------------------------------------- the structural rules
def _lm(x, w):
    return (x @ w.T).astype(np.float32)


def _rotate_group_one(q, k, v):
    """group 1's keys shifted by one position (a slicing slip in a per-group loop)."""
    k = k.copy()
    if k.shape[1] > 1:
        k[:, 1] = np.roll(k[:, 1], 1, axis=0)
    return attention(q, k, v)


def _half_factor(values):
    """a student's output with its last row doubled (T = 1 cases then fail entirely)."""
    out = values.copy()
    out[-1] *= 2
    return out


def _rotary_odd_scaled(x, positions):
    out = rotary(x, positions)
    R = x.shape[-1] // 2
    out[..., 1:R:2] *= 1.5
    return out


def _rotary_cos_for_sin(x, positions):
    """out[2i+1] = x[2i+1]·cos + x[2i]·cos: a typo, cos where sin belongs."""
    out = rotary(x, positions)
    R = x.shape[-1] // 2
    theta = 1.0 / 10000 ** (np.arange(0, R, 2) / R)
    cos = np.cos(positions[:, None] * theta)[:, None, :]
    out[..., 1:R:2] = x[..., 1:R:2] * cos + x[..., 0:R:2] * cos
    return out


def _rotary_rest_doubled(x, positions):
    out = rotary(x, positions)
    out[..., x.shape[-1] // 2 :] *= 2
    return out


def _rotary_angle_times(x, positions, factor):
    return rotary(x, (positions * factor).astype(np.float64))


def _heads_summed(q, k, v):
    out = attention(q, k, v)
    return np.repeat(out.sum(axis=1, keepdims=True), q.shape[1], axis=1)


def _swiglu_of_unit_rows(x, w1, w2):
    unit = x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(x.shape[1])
    return swiglu(unit, w1, w2)


def _swiglu_rolled_down(x, w1, w2):
    """the up half of w_h_to_4h ([F, D]) used as the down projection."""
    F = w1.shape[0] // 2
    return swiglu(x, w1, w1[F:].T)


def _rms_half_root(x, w, eps):
    """the root kept in bfloat16 (float32 with the low 16 bits of the mantissa cut)."""
    root = np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps).astype(np.float32)
    root = (root.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return (x / root * w).astype(np.float32)


def _input_on_one_case_only(x, w, eps):
    return x if x.shape[0] == 3 else rms(x, w, eps) * 2


def _exp_weights_unscaled(q, k, v):
    """exp(q·k) as the weights: neither scaled nor normalised."""
    T, H, _ = q.shape
    S, G, _ = k.shape
    heads = np.arange(H) // (H // G)
    scores = np.einsum("thd,shd->hts", q, k[:, heads]) / 4
    allowed = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]
    weights = np.where(allowed, np.exp(scores - scores.max()), 0.0)
    return np.einsum("hts,shd->thd", weights, v[:, heads]).astype(np.float32)


def _swiglu_of_norm_one_rows(x, w1, w2):
    return swiglu(x / np.sqrt(np.sum(x**2, axis=1, keepdims=True)), w1, w2)


def _softplus_swiglu(x, w1, w2):
    return swiglu(x, w1, w2, activation=lambda z: np.log1p(np.exp(z)))


# (rule, exercise, function, phrase the hint must contain)
TRIGGERS = [
    ("last row", "lm_head", lambda x, w: _half_factor(_lm(x, w)), "only the last row"),
    ("rows after the first", "lm_head", lambda x, w: _lm(np.cumsum(x, 0), w), "row 0 is right"),
    (
        "all rows but the last",
        "lm_head",
        lambda x, w: _lm(np.cumsum(x[::-1], 0)[::-1], w),
        "every row but the last",
    ),
    (
        "new row of a cache",
        "kv_cache_step",
        lambda q, k, v, ck, cv: kv_step(q, 2 * k, v, ck, cv),
        "only the new row S of cache_k",
    ),
    ("a kv group", "attention", _rotate_group_one, "every head of kv group 1"),
    ("odd channels", "rotary", _rotary_odd_scaled, "second channel of each rotated pair"),
    ("pass-through channels", "rotary", _rotary_rest_doubled, "only the pass-through channels"),
    ("cases", "attention", p(attention, recent_keys_only=True), "keys come before the queries"),
    ("plus an input", "rms_norm", lambda x, w, eps: rms(x, w, eps) + x, "plus the input x"),
    ("minus an input", "rms_norm", lambda x, w, eps: rms(x, w, eps) - x, "minus the input x"),
    (
        "times an input",
        "rms_norm",
        lambda x, w, eps: rms(x, w, eps) * x,
        "multiplied by the input x",
    ),
    (
        "zeros",
        "attention",
        lambda q, k, v: attention(q, k, v) * (np.arange(q.shape[1]) > 0)[:, None],
        "all 0",
    ),
    ("sign", "rms_norm", lambda x, w, eps: -rms(x, w, eps), "wrong sign"),
    (
        "named factor",
        "lm_head",
        lambda x, w: _lm(x, w) * np.sqrt(w.shape[0]),
        "multiplied by sqrt(V)",
    ),
    ("constant factor", "lm_head", lambda x, w: _lm(x, w) * 1.37, "1.37 × the right values"),
    (
        "per-row factor",
        "rms_norm",
        lambda x, w, eps: x / (np.mean(np.abs(x), -1, keepdims=True) + eps) * w,
        "each row is the right row times its own factor",
    ),
    ("per-channel factor", "rms_norm", lambda x, w, eps: rms(x, np.abs(w), eps), "each channel"),
    ("constant shift", "lm_head", lambda x, w: _lm(x, w) + 0.5, "shifted by the same constant"),
    (
        "per-row shift",
        "lm_head",
        lambda x, w: _lm(x, w) - _lm(x, w).mean(axis=1, keepdims=True),
        "its own constant",
    ),
    (
        "shift along an axis",
        "rms_norm",
        lambda x, w, eps: np.roll(rms(x, w, eps), 1, axis=1),
        "shifted by -1",
    ),
    (
        "heads reordered",
        "attention",
        lambda q, k, v: attention(q, k, v)[:, ::-1],
        "heads are in reverse",
    ),
    (
        "layout",
        "rms_norm",
        lambda x, w, eps: rms(x, w, eps).T.reshape(x.shape),
        "right numbers, in the wrong places",
    ),
    (
        "precision",
        "lm_head",
        lambda x, w: (x.astype(np.float16) @ w.T.astype(np.float16)).astype(np.float32),
        "precision slip",
    ),
    ("inputs exchanged", "attention", p(attention, swap_kv=True), "k and v exchanged"),
    (
        "scores' scale",
        "attention",
        lambda q, k, v: attention(q * np.sqrt(q.shape[2]) / q.shape[1], k, v),
        "divided by H instead",
    ),
    ("one key", "attention", p(attention, only_first=True), "the value of key 0"),
    ("uniform", "attention", lambda q, k, v: attention(0 * q, k, v), "plain mean of the values"),
    ("pair lengths", "rotary", _rotary_cos_for_sin, "change length"),
    (
        "position shift",
        "rotary",
        lambda x, positions: rotary(x, positions, offset=-2),
        "positions[t]-2",
    ),
    ("wrong angle", "rotary", p(_rotary_angle_times, factor=3), "turns by the wrong angle"),
    ("activation", "swiglu", _softplus_swiglu, "gate's activation is wrong"),
    ("decode position", "kv_cache_step", p(kv_step, key_offset=2), "rotated at position S+2"),
    ("embedding rows", "embedding", lambda ids, table: table[(ids + 2) % len(table)], "ids[t]+2"),
    ("returned input", "rms_norm", lambda x, w, eps: x, "the input x, unchanged"),
    ("heads mixed", "attention", _heads_summed, "every head gives the same output"),
    ("bent output", "lm_head", lambda x, w: 10 * np.tanh(_lm(x, w) / 10), "pulled in towards 0"),
    ("normalised input", "swiglu", _swiglu_of_unit_rows, "right answer for x normalised"),
    ("last matrix", "swiglu", _swiglu_rolled_down, "so the last step is wrong"),
    ("imprecise normaliser", "rms_norm", _rms_half_root, "small factor of its own"),
    (
        "column shift",
        "embedding",
        lambda ids, table: table[ids] - table[:1],
        "depends only on the column",
    ),  # fmt: skip
    (
        "distributions",
        "lm_head",
        lambda x, w: softmax_rows(_lm(x, w) * 2),
        "probability distribution",
    ),  # fmt: skip
    ("norm-1 input", "swiglu", _swiglu_of_norm_one_rows, "x normalised (x / |x|)"),
    (
        "weights: not of v",
        "attention",
        lambda q, k, v: attention(q, k, v) + 0.3 * q,
        "not a weighted sum",
    ),  # fmt: skip
    (
        "weights: negative",
        "attention",
        p(attention, plain_scores=True),
        "weights your queries give the values are negative",
    ),  # fmt: skip
    ("weights: mask", "attention", p(attention, mask_from=1), "give no weight to earlier keys"),
    ("weights: sums", "attention", _exp_weights_unscaled, "instead of 1"),
    ("weights: scores", "attention", p(attention, head_of_q=0), "not the right ones"),
    (
        "shape",
        "attention",
        lambda q, k, v: np.einsum("thd,shd->hts", q, np.repeat(k, q.shape[1] // k.shape[1], 1)),
        "the shape is wrong",
    ),  # fmt: skip
]

# (rule, exercise, function, phrase the hint must NOT contain): a near-miss of each rule
NEAR_MISSES = [
    ("last row", "lm_head", lambda x, w: _lm(x, w) * 2.5, "only the last row"),
    ("rows after the first", "lm_head", lambda x, w: _lm(x + 1, w), "row 0 is right"),
    ("all rows but the last", "lm_head", lambda x, w: _lm(np.cumsum(x, 0), w), "every row but"),
    (
        "new row of a cache",
        "kv_cache_step",
        lambda q, k, v, ck, cv: kv_step(q, k, v, 2 * ck, cv),
        "only the new row",
    ),
    ("a kv group", "attention", lambda q, k, v: attention(q, np.roll(k, 1, 0), v), "kv group 1"),
    ("odd channels", "rotary", p(rotary, offset=1), "second channel of each"),
    (
        "pass-through channels",
        "rotary",
        lambda x, positions: rotary(x, positions) * 2,
        "pass-through",
    ),
    ("cases", "attention", lambda q, k, v: attention(q, k, v) * 2, "keys come before"),
    ("plus an input", "rms_norm", lambda x, w, eps: rms(x, w, eps) + 2 * x, "plus the input"),
    ("minus an input", "rms_norm", lambda x, w, eps: rms(x, w, eps) - 2 * x, "minus the input"),
    (
        "times an input",
        "rms_norm",
        lambda x, w, eps: rms(x, w, eps) * (x + 1),
        "multiplied by the input",
    ),
    (
        "zeros",
        "attention",
        lambda q, k, v: attention(q, k, v) * (np.arange(q.shape[1]) > 0)[:, None] + 0.01,
        "all 0",
    ),
    ("sign", "rms_norm", lambda x, w, eps: -1.5 * rms(x, w, eps), "wrong sign"),
    ("named factor", "lm_head", lambda x, w: _lm(x, w) * 3.1, "multiplied by sqrt"),
    (
        "constant factor",
        "lm_head",
        lambda x, w: _lm(x, w) * np.arange(1, x.shape[0] + 1)[:, None],
        "one constant factor",
    ),
    ("per-row factor", "rms_norm", lambda x, w, eps: rms(x, w, eps) + 0.1, "its own factor"),
    ("per-channel factor", "rms_norm", lambda x, w, eps: rms(x, w, eps) * 2, "each channel"),
    (
        "constant shift",
        "lm_head",
        lambda x, w: _lm(x, w) + np.arange(x.shape[0])[:, None],
        "same constant",
    ),
    (
        "per-row shift",
        "lm_head",
        lambda x, w: _lm(x, w) + np.arange(w.shape[0]),
        "its own constant",
    ),
    (
        "shift along an axis",
        "rms_norm",
        lambda x, w, eps: np.roll(rms(x, w, eps), 1, axis=1) * 2,
        "shifted by",
    ),
    ("heads reordered", "attention", lambda q, k, v: attention(q, k, v)[:, ::-1] * 2, "reverse"),
    (
        "layout",
        "rms_norm",
        lambda x, w, eps: rms(x, w, eps).T.reshape(x.shape) * 2,
        "wrong places",
    ),
    ("precision", "lm_head", lambda x, w: _lm(x, w) * 1.05, "precision"),
    ("inputs exchanged", "attention", lambda q, k, v: attention(q, k, 2 * v), "exchanged"),
    (
        "scores' scale",
        "attention",
        lambda q, k, v: attention(q / q.shape[1], k, v),
        "divided by H instead",
    ),
    ("one key", "attention", lambda q, k, v: attention(q * 3, k, v), "the value of"),
    ("uniform", "attention", lambda q, k, v: attention(q * 0.5, k, v), "plain mean"),
    ("pair lengths", "rotary", p(rotary, offset=3), "change length"),
    ("position shift", "rotary", p(_rotary_angle_times, factor=3), "the angle of position"),
    ("wrong angle", "rotary", p(rotary, offset=1), "wrong angle"),
    ("activation", "swiglu", lambda x, w1, w2: swiglu(x, w1, 2 * w2), "activation is wrong"),
    ("decode position", "kv_cache_step", p(kv_step, tril=True), "rotated at position"),
    ("embedding rows", "embedding", lambda ids, table: table[ids] * 2, "row of the table"),
    ("returned input", "rms_norm", _input_on_one_case_only, "unchanged"),
    ("heads mixed", "attention", lambda q, k, v: attention(q, k, v)[:, ::-1], "same output"),
    ("bent output", "lm_head", lambda x, w: _lm(x.astype(np.float16), w), "pulled in"),
    ("normalised input", "swiglu", lambda x, w1, w2: swiglu(2 * x, w1, w2), "x normalised"),
    ("last matrix", "swiglu", _softplus_swiglu, "the last step is wrong"),
    ("imprecise normaliser", "rms_norm", lambda x, w, eps: rms(x, w, eps) * 1.05, "small factor"),
    (
        "column shift",
        "embedding",
        lambda ids, table: table[ids] - table[ids].mean(1, keepdims=True),
        "depends only on the column",
    ),  # fmt: skip
    ("distributions", "lm_head", lambda x, w: np.abs(_lm(x, w)), "probability distribution"),
    ("norm-1 input", "swiglu", _swiglu_of_unit_rows, "x / |x|"),
    ("weights: not of v", "attention", p(attention, plain_scores=True), "not a weighted sum"),
    ("weights: negative", "attention", p(attention, head_of_q=0), "negative"),
    ("weights: mask", "attention", p(attention, renormalise=False), "earlier keys"),
    ("weights: sums", "attention", p(attention, head_of_q=0), "instead of 1"),
    ("weights: scores", "attention", p(attention, mask_from=1), "not the right ones"),
    (
        "shape",
        "attention",
        lambda q, k, v: attention(q, k, v).transpose(1, 0, 2),
        "the shape is wrong",
    ),  # fmt: skip
]


def _diagnosis(name, student):
    with np.errstate(all="ignore"):
        result = check(name, student)
    assert not result.passed
    return result


@pytest.mark.parametrize("rule, name, student, phrase", TRIGGERS, ids=[t[0] for t in TRIGGERS])
def test_a_structural_rule_fires_on_its_mistake(rule, name, student, phrase):
    result = _diagnosis(name, student)
    assert phrase.lower() in result.likely_bug.lower(), result.message
    assert RECOMPUTE not in result.likely_bug


@pytest.mark.parametrize(
    "rule, name, student, phrase", NEAR_MISSES, ids=[t[0] for t in NEAR_MISSES]
)
def test_a_structural_rule_stays_quiet_on_a_near_miss(rule, name, student, phrase):
    result = _diagnosis(name, student)
    assert phrase.lower() not in result.likely_bug.lower(), result.message


def test_every_rule_has_a_trigger_and_a_near_miss():
    assert [t[0] for t in TRIGGERS] == [n[0] for n in NEAR_MISSES]


# ------------------------------------------------------------- top_p: the set in probability order
def _ranked(logits, p, ranks):
    """the tokens at these ranks of the probability order (0 = most likely)."""
    order = np.argsort(-logits, kind="stable")
    return set(order[[r for r in ranks(len(ref("top_p")(logits, p)), len(order))]].tolist())


SET_RULES = [
    (
        "tokens past the boundary",
        lambda lg, p: _ranked(lg, p, lambda n, V: range(min(n + 3, V))),
        "past the boundary are kept (the tail)",
    ),
    (
        "tokens before the boundary missing",
        lambda lg, p: _ranked(lg, p, lambda n, V: range(max(1, n - 3))),
        "is missing",
    ),
    (
        "not the most likely",
        lambda lg, p: _ranked(lg, p, lambda n, V: range(V - n, V)),
        "not the most likely tokens",
    ),
    ("not token ids", lambda lg, p: {-1}, "not token ids"),
    ("sorted positions", p(top_p, positions=True), "positions in the sorted order, not token ids"),
    ("empty", lambda lg, p: set(), "you keep no token"),
]


@pytest.mark.parametrize("rule, student, phrase", SET_RULES, ids=[r[0] for r in SET_RULES])
def test_top_p_sets_are_placed_in_probability_order(rule, student, phrase):
    result = _diagnosis("top_p", student)
    assert phrase in result.likely_bug, result.message
    assert RECOMPUTE not in result.likely_bug


def test_top_p_near_misses_are_not_called_order_or_count_errors():
    # the right set, as a list: accepted, nothing to diagnose
    assert check("top_p", lambda lg, p: sorted(ref("top_p")(lg, p))).passed
    # a prefix of the order is never called "not the most likely tokens"
    bug = _diagnosis("top_p", p(top_p, extra=3)).likely_bug
    assert "not the most likely" not in bug and "past the boundary" in bug
    # a set in the wrong order but of the right size is not called a counting error
    bug = _diagnosis("top_p", lambda lg, q: _ranked(lg, q, lambda n, V: range(1, n + 1))).likely_bug
    assert "not the most likely" in bug and "past the boundary" not in bug


# ------------------------------------------------------------- guarantees
def test_a_wrong_dtype_does_not_hide_wrong_values():
    bug = _diagnosis("lm_head", lambda x, w: (x @ w.T).astype(np.float64) + 0.5).likely_bug
    assert "float32" in bug and "shifted by the same constant" in bug.lower()


def test_the_analysis_survives_strange_outputs():
    name = "attention"
    exercise = EXERCISES[name]
    cases = exercise.make_cases()
    expected = [exercise.reference(*c.args) for c in cases]

    class Outcome:
        kind = "value"

        def __init__(self, value):
            self.value = value

    strange = [np.array(["a"]), np.full((2, 2), np.nan), None, object(), np.zeros((0,))]
    for value in strange:
        outcomes = [Outcome(value) for _ in cases]
        assert structural_hint(exercise, cases, outcomes, expected) is None
    # outputs that change shape from case to case: the comparable cases are still analysed
    mixed = _diagnosis(name, lambda q, k, v: q[:, :1] if len(q) == 1 else -attention(q, k, v))
    assert "wrong sign" in mixed.likely_bug


@pytest.mark.parametrize("name", list(EXERCISES))
def test_an_uncatalogued_mistake_always_gets_more_than_recompute_by_hand(name):
    """A wrong answer no rule knows: the analysis still says where and how it is wrong."""
    exercise = EXERCISES[name]
    rng = np.random.default_rng(0)

    def noisy(*args):
        right = exercise.reference(*args)
        if isinstance(right, set):
            return right ^ {int(rng.integers(len(args[0])))}
        if isinstance(right, tuple):
            return (right[0] + rng.normal(size=right[0].shape).astype(np.float32), *right[1:])
        return right + rng.normal(size=right.shape).astype(np.float32)

    bug = _diagnosis(name, noisy).likely_bug
    assert RECOMPUTE not in bug and len(bug) > 40


STRANGE = [
    lambda right: right.astype(np.complex64) * 1j,
    lambda right: right > 0,
    lambda right: np.full_like(right, 1e300, dtype=np.float64),
    lambda right: right.astype(object),
    lambda right: right[..., None],
]


@pytest.mark.parametrize("name", list(EXERCISES))
@pytest.mark.parametrize("index", range(len(STRANGE)))
def test_strange_outputs_never_break_the_check(name, index):
    exercise = EXERCISES[name]

    def student(*args):
        right = exercise.reference(*args)
        if isinstance(right, set):
            return STRANGE[index](np.array(sorted(right)))
        if isinstance(right, tuple):
            return (right[0], STRANGE[index](right[1]), right[2])
        return STRANGE[index](right)

    with np.errstate(all="ignore"):
        result = check(name, student)
    # an int array of shape [n, 1] is still a set of ids for top_p; everything else fails
    assert result.passed or (result.likely_bug and "likely bug:" in result.message)
