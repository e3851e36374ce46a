"""Where and how a wrong output is wrong, when no known mistake explains it.

A teacher faced with an unknown bug first localises it, then characterises it. This module does
the same with the student's outputs on every case and the right answers:

where  which cases fail (e.g. only those whose heads share kv groups), and inside an output which
       rows (only the newest token, only rows after the first, the cached part or the new row of
       a cache), which heads (every head of one kv group) and which channels (only the rotated
       channels, only the second channel of each pair, only the pass-through channels);
how    values that are 0, equal to an input, equal to the answer plus an input, sign-flipped,
       multiplied by a constant (named when it is a size: "divided by sqrt(D)") or by a factor per
       row or per channel, shifted by a constant, moved along an axis (a permutation, an
       off-by-one shift, the answer of another position), the right numbers in the wrong places,
       or right to a few digits only (a precision slip);
       for the set of top_p: missing or extra tokens and where they sit in probability order.

When these generic characterisations find nothing, the exercise's probes (probes.py) try the
right layer with one thing changed (an input in another's place, the scores' scale, the rotation
angle, the activation, the position). Each finding is phrased for a student and points at the
step of the definition to re-read (``STEPS``). ``structural_hint`` never raises: a student's
output that cannot be analysed gives None, and the caller falls back to a plain hint.

Shape legend: T tokens · S cached + new · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from glm_numpy.exercises.cases import Case
from glm_numpy.exercises.compare import ArraysOutput, IdSetOutput, _as_id_set
from glm_numpy.exercises.evidence import Layout, Pair, fit_factor, layout_of, named_factor
from glm_numpy.exercises.probes import probes_for
from glm_numpy.generation import softmax as softmax_1d


def _inputs(args: tuple, names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
    """The array arguments of a case, by the names the student knows them by."""
    return [
        (f"the input {n}", a)
        for n, a in zip(names, args)
        if isinstance(a, np.ndarray) and a.dtype.kind == "f"
    ]


# ------------------------------------------------------------------ steps to re-read, per exercise
# finding -> the step of the definition to re-read. A finding missing here gets only its
# description.
STEPS: dict[str, dict[str, str]] = {
    "embedding": {
        "rows": "row t of the output is row ids[t] of the table (ids count from 0)",
        "scale": "the rows are used as they are, no scaling",
        "precision": "a row lookup is exact: copy the float32 rows, do not round them",
        "column_shift": "the rows are used as they are: nothing subtracted or added",
        "default": "out[t] is row ids[t] of the table, unchanged, in the order of ids",
    },
    "rms_norm": {
        "row_scale": "re-read the normaliser of each row: divide by sqrt(mean(x²) + eps), the "
        "mean of the squares of x itself over the row's D features (before the weight)",
        "channel_scale": "re-read the last step: multiply by weight [D], once",
        "scale": "re-read the normaliser: sqrt(mean(x²) + eps), over the D features",
        "shift": "RMSNorm subtracts nothing and adds nothing: x / sqrt(mean(x²) + eps) * weight",
        "row_shift": "RMSNorm subtracts nothing and adds nothing: x / sqrt(mean(x²) + eps) * "
        "weight",
        "precision": "compute in float32 (float16 loses the small squares)",
        "input_added": "re-read the last step: the weight multiplies the normalised x, it is not "
        "added",
        "input_multiplied": "re-read the last step: multiply by weight once",
        "default": "re-read y = x / sqrt(mean(x²) + eps) * weight step by step: the mean of the "
        "squares over each row, eps inside the root, a division, then the weight multiplied",
    },
    "rotary": {
        "rotated": "re-read the rotation of the pairs (2i, 2i+1): out[2i] = x[2i]·cos − "
        "x[2i+1]·sin, out[2i+1] = x[2i+1]·cos + x[2i]·sin, with angle position·θᵢ",
        "odd": "re-read out[2i+1] = x[2i+1]·cos + x[2i]·sin: it needs the ORIGINAL x[2i] (if you "
        "overwrite the even channels in place first, keep a copy)",
        "even": "re-read out[2i] = x[2i]·cos − x[2i+1]·sin",
        "passthrough": "channels R..Dh-1 pass through unchanged: start from a copy of x",
        "later_pairs": "re-read the frequencies θᵢ = 10000^(-2i/R): pair 0 turns by the "
        "position itself, later pairs slower",
        "cases": "re-read how the angle is built from positions[t] (not from t)",
        "sign": "re-read out[2i] = x[2i]·cos − x[2i+1]·sin: the minus goes with sin in the first "
        "channel of the pair",
        "angle": "re-read the angle of pair i at position p: p·θᵢ with θᵢ = 10000^(-2i/R), and "
        "which of cos and sin goes where",
        "heads": "every head turns by the same angles: broadcast cos/sin over the head axis",
        "default": "re-read the rotation of the pairs (2i, 2i+1) with angle positions[t]·θᵢ, "
        "θᵢ = 10000^(-2i/R)",
    },
    "attention": {
        "heads": "re-read which kv group each head uses: head h reads group h // (H/G)",
        "groups": "re-read which kv group each head uses: head h reads group h // (H/G)",
        "row_scale": "re-read the softmax: each query's weights over the keys it may see add up "
        "to 1 (softmax over the key axis, masked keys weight 0, normalised after masking)",
        "scores": "re-read the scaling of the scores: q·k / sqrt(Dh), before the softmax",
        "after_first": "re-read the causal mask: query t sits at position S - T + t and sees "
        "keys 0..S-T+t, the S - T cached keys before the queries included",
        "before_last": "re-read the causal mask: query t sits at position S - T + t and sees "
        "keys 0..S-T+t, no later ones",
        "layout": "re-read how the heads are laid out: the output is [T, H, Dh] (transpose "
        "[H, T, Dh] with np.transpose / einsum, a reshape does not move the axes)",
        "precision": "keep the scores in float32: float16 cannot hold large scores precisely",
        "one_key": "re-read the causal mask: query t (at position S - T + t) sees keys 0..S-T+t",
        "values": "re-read the last step: the weighted sum of the values v (not k), each head "
        "with its group h // (H/G)",
        "default": "re-read the steps in order on the failing case: scores q·k / sqrt(Dh) for "
        "each head with its group h // (H/G), the causal mask, a softmax over the key axis "
        "(each query's row adds up to 1), then the weighted sum of the values v",
    },
    "swiglu": {
        "input_added": "the residual x + MLP(x) belongs to the block, not to swiglu (add nothing)",
        "down": "re-read the last step: multiply by w_4h_to_h.T ([F, D]), nothing after it",
        "combine": "re-read the middle step: silu(gate) * up, gate the first F channels",
        "activation": "re-read silu(z) = z * sigmoid(z) = z / (1 + exp(-z)): not GELU, not "
        "sigmoid alone",
        "normalised_input": "swiglu takes x as it is given: the block normalises before it",
        "default": "re-read out = (silu(gate) * up) @ w_4h_to_h.T with silu(z) = z·sigmoid(z), "
        "gate the first F channels of x @ w_h_to_4h.T and up the second F",
    },
    "lm_head": {
        "row_shift": "lm_head returns the raw logits x @ w.T: nothing subtracted",
        "row_scale": "lm_head returns the raw logits x @ w.T of the input as given (no norm, no "
        "scaling)",
        "scale": "lm_head returns the raw logits x @ w.T: no scaling",
        "channel_scale": "lm_head uses the rows of w as they are: logits = x @ w.T (nothing "
        "normalised)",
        "squashed": "lm_head returns the raw logits x @ w.T: nothing applied after the product",
        "distribution": "lm_head returns the raw logits x @ w.T: the softmax comes later, in "
        "sampling",
        "normalised_input": "lm_head multiplies x as it is given (the final norm comes before "
        "it, in the model)",
        "precision": "compute the product in float32, not float16",
        "default": "lm_head returns the raw logits x @ w.T and nothing else",
    },
    "block": {
        "both_halves": "each half is right on its own but the two do not join right: the MLP "
        "reads post_attention_layernorm(x1) with x1 = x + attention output, and the block "
        "returns x1 + MLP",
        "input_added": "the block's input x is added once too often: x1 = x + attention, "
        "out = x1 + MLP",
        "input_missing": "a residual is missing: x1 = x + attention, out = x1 + MLP",
        "after_first": "row 0 is right and the later rows are not: look at what depends on the "
        "position — rotary of q and k, and the causal mask (row 0 sees only itself)",
        "before_last": "only the last row is right — it is the one row that may see every key: "
        "re-read the causal mask (a query sees no later position)",
        "default": "re-read the block step by step: input_layernorm, q|k|v with the bias, "
        "rotary on q and k only, grouped causal attention, dense, the first residual, "
        "post_attention_layernorm, SwiGLU, the second residual",
    },
    "kv_cache_step": {
        "out": "out is wrong while both caches are right: re-read how the new query is rotated "
        "(at position S) and how it attends to all S + 1 cached keys (scale 1/sqrt(Dh), group "
        "h // (H/G), no mask needed: every cached key is earlier)",
        "new": "re-read steps 2-3: the new key is rotated at position S, then appended as row "
        "S; the value is appended unrotated",
        "cached": "the S rows you were given are already right: append to them, do not change them",
        "heads": "re-read which kv group each head uses: head h reads group h // (H/G)",
        "groups": "re-read which kv group each head uses: head h reads group h // (H/G)",
        "scores": "re-read the scaling of the scores: q·k / sqrt(Dh), before the softmax",
        "precision": "keep the attention in float32",
        "one_key": "the new token is the LAST position: it sees every one of the S + 1 keys, so "
        "no mask is needed (a mask built for T = S hides all but key 0)",
        "position": "re-read step 1: the new token sits at position S, the number of tokens "
        "already cached (positions count from 0); q and k both turn there",
        "default": "re-read the four steps: position S, rotate q and k there, append the rotated "
        "k and the unrotated v, attend over all S + 1 rows",
    },
}

_GENERIC_STEP = "recompute that part by hand against the definition: {signature}"

# ------------------------------------------------------------------ where


# Each *_where gives a region key, None when the whole axis is wrong (or no pattern), or ANY
# when the axis has a single index and so says nothing (it agrees with every other case).
ANY = "*"


def _rows_where(wrong_rows: np.ndarray, n: int, new_row: int) -> str | None:
    if n == 1:
        return ANY
    if new_row >= 0:  # a cache: the first rows were given, one is appended
        if wrong_rows.all():
            return None
        if list(np.flatnonzero(wrong_rows)) == [new_row]:
            return "new"
        if not wrong_rows[new_row]:
            return "cached"
        return None
    if wrong_rows.all():
        return None
    if list(np.flatnonzero(wrong_rows)) == [n - 1]:
        return "last"
    if not wrong_rows[0] and wrong_rows[1:].all():
        return "after_first"
    if list(np.flatnonzero(wrong_rows)) == [0]:
        return "first"
    if not wrong_rows[-1] and wrong_rows[:-1].all():
        return "before_last"
    return "some_rows"


def _heads_where(wrong_heads: np.ndarray, per_group: int) -> str | None:
    n = len(wrong_heads)
    if n < 2:
        return ANY
    if wrong_heads.all():
        return None
    if per_group >= 1 and n > per_group:
        by_group = wrong_heads.reshape(-1, per_group)
        if (by_group.all(axis=1) | ~by_group.any(axis=1)).all():
            groups = np.flatnonzero(by_group.all(axis=1))
            return "groups:" + ",".join(map(str, groups))
    return "heads:" + ",".join(map(str, np.flatnonzero(wrong_heads)))


def _channels_where(wrong_channels: np.ndarray, R: int) -> str | None:
    n = len(wrong_channels)
    if R == 0 or wrong_channels.all():
        return None
    wrong = set(np.flatnonzero(wrong_channels).tolist())
    rotated, odd, even = set(range(R)), set(range(1, R, 2)), set(range(0, R, 2))
    if wrong and wrong <= set(range(R, n)):
        return "passthrough"
    if wrong and wrong <= odd:
        return "odd"
    if wrong and wrong <= even:
        return "even"
    if wrong and wrong <= rotated and 0 not in wrong and 1 not in wrong:
        return "later_pairs"
    if wrong and wrong <= rotated:
        return "rotated"
    return None


# With two rows, "only the last row" is also "only the rows after the first": either may be the
# pattern the other cases show.
_SAME_WITH_TWO_ROWS = {"last": {"last", "after_first"}, "first": {"first", "before_last"}}


def _where(pairs: list[Pair]) -> list[str]:
    """Region keys that hold in every failing case, e.g. ["last"], ["groups:1"], ["odd"] (the
    detail after ':' is the first case's)."""
    candidates: dict[int, set[str]] = {}  # axis -> region kinds still possible
    details: dict[str, str] = {}
    first_seen: dict[int, str] = {}
    for pair in pairs:
        wrong, layout = pair.wrong, pair.layout
        for axis, meaning in enumerate(layout.axes):
            per_index = np.moveaxis(wrong, axis, 0).reshape(wrong.shape[axis], -1).any(axis=1)
            if meaning in ("token", "row"):
                key = _rows_where(per_index, len(per_index), layout.new_row)
            elif meaning in ("head", "group"):
                key = _heads_where(per_index, layout.heads_per_group)
            elif meaning == "channel":
                key = _channels_where(per_index, layout.rotary_dims)
            else:
                key = None
            if key == ANY:
                continue
            kind = key.partition(":")[0] if key else ""
            details.setdefault(kind, key or "")
            kinds = {kind}
            if len(per_index) == 2 and layout.new_row < 0:
                kinds = _SAME_WITH_TWO_ROWS.get(kind, kinds)
            first_seen.setdefault(axis, kind)
            candidates[axis] = candidates.get(axis, kinds) & kinds
    found = []
    for axis in sorted(candidates):
        kinds = sorted(candidates[axis] - {""}, key=lambda k: k != first_seen[axis])
        if kinds:
            found.append(details.get(kinds[0], kinds[0]))
    return found


def _describe_where(key: str, part: str) -> str:
    of = f" of {part}" if part else ""
    kind, _, detail = key.partition(":")
    return {
        "new": f"only the new row S{of} is wrong (the S cached rows are right)",
        "cached": f"the cached rows 0..S-1{of} are wrong (the new row S is right)",
        "last": f"only the last row{of} (the newest token) is wrong; the rows before it are right",
        "after_first": f"row 0{of} is right but every row after it is wrong",
        "first": f"only the first row{of} is wrong",
        "before_last": f"every row{of} but the last is wrong (the last row is right)",
        "some_rows": f"only some rows{of} are wrong",
        "groups": f"every head of kv group {detail} is wrong, the other groups' heads are right",
        "heads": f"only head{'s' if ',' in detail else ''} {detail}{of} "
        f"{'are' if ',' in detail else 'is'} wrong",
        "passthrough": "only the pass-through channels R..Dh-1 are wrong (the rotated ones are "
        "right)",
        "odd": "only the second channel of each rotated pair (2i+1) is wrong",
        "even": "only the first channel of each rotated pair (2i) is wrong",
        "later_pairs": "pair 0 (channels 0, 1) is right but the later rotated pairs are wrong",
        "rotated": "only the rotated channels 0..R-1 are wrong (the pass-through channels are "
        "right)",
    }[kind]


# ------------------------------------------------------------------ how


def _fits(got: np.ndarray, given: np.ndarray, relation, pair: Pair) -> bool:
    """Whether got = relation(expected, given), with ``given`` broadcast to the output (a [D]
    weight against a [T, D] output)."""
    try:
        given = np.broadcast_to(given.astype(np.float64), got.shape)
    except ValueError:
        return False
    if given.ndim == 0:
        return False
    return bool(pair.near(got, relation(pair.expected, given)).all())


def _factor_phrase(factors: list[float], layouts: list[Layout]) -> str | None:
    if all(abs(c + 1) < 2e-3 for c in factors):
        return "have the wrong sign (they are −1 × the right values)"
    if all(abs(c) < 1e-6 or abs(c - 1) < 1e-2 for c in factors):
        return None  # a factor this close to 1 is rounding, not a step
    name = named_factor(factors, layouts)
    if name:
        if name.startswith("1/"):
            return f"are divided by {name[2:]} (they are {name} × the right values)"
        return f"are multiplied by {name} (they are {name} × the right values)"
    if np.allclose(factors, factors[0], rtol=2e-3):
        return f"are all {factors[0]:.4g} × the right values (one constant factor)"
    return "are each case's right values times one constant (a different one per case: " + (
        ", ".join(f"{c:.3g}" for c in factors[:4]) + ")"
    )


def _rows_vectors(a: np.ndarray) -> np.ndarray:
    """[T, ...] -> [rows, last]: each row of the last axis (a token's channels, or a token's
    head's channels) as one vector."""
    return a.reshape(-1, a.shape[-1])


def _per_axis_factor(pair: Pair, axis: int) -> np.ndarray | None:
    """The factors f when got = f * expected with one factor per row (axis 1) or per channel
    (axis 0) of the [rows, last] view; None otherwise."""
    got, expected = _rows_vectors(pair.got), _rows_vectors(pair.expected)
    norms = np.sum(expected * expected, axis=axis, keepdims=True)
    safe = np.where(norms > 0, norms, 1.0)
    factors = np.where(norms > 0, np.sum(got * expected, axis=axis, keepdims=True) / safe, 1.0)
    return factors if pair.near(factors * expected, got).all() else None


def _shift(pair: Pair, per_row: bool) -> float | None:
    difference = _rows_vectors(pair.got - pair.expected)
    if per_row:
        offsets = difference.mean(axis=1, keepdims=True)
    else:
        offsets = np.full((1, 1), difference.mean())
    expected = _rows_vectors(pair.expected)
    if not pair.near(expected + offsets, _rows_vectors(pair.got)).all():
        return None
    return float(np.abs(offsets).max())


def _column_shift(pair: Pair) -> bool | None:
    """got = expected + one constant per column; None for a single row (any offset fits)."""
    difference = _rows_vectors(pair.got - pair.expected)
    if difference.shape[0] < 2:
        return None
    offsets = difference.mean(axis=0, keepdims=True)
    expected = _rows_vectors(pair.expected)
    return bool(pair.near(expected + offsets, _rows_vectors(pair.got)).all())


def _distributions(pair: Pair) -> bool:
    rows, right = _rows_vectors(pair.got), _rows_vectors(pair.expected)
    sums_to_one = np.allclose(rows.sum(axis=1), 1, atol=1e-3) and (rows >= -1e-6).all()
    return bool(sums_to_one and not np.allclose(right.sum(axis=1), 1, atol=1e-3))


def _moved_along(pair: Pair, axis: int) -> list[int] | None:
    """Where each slice of got along ``axis`` comes from in expected (index per slice), when every
    slice equals some slice of expected; None otherwise. A long axis (a 2500-row cache) is only
    tried for small shifts and a reversal, so that the search stays linear."""
    got, expected = np.moveaxis(pair.got, axis, 0), np.moveaxis(pair.expected, axis, 0)
    n = got.shape[0]
    if n < 2:
        return None
    if n > 64:
        candidates = [list(range(n))[::-1]]
        candidates += [[(i - k) % n for i in range(n)] for k in (1, -1, 2, -2, 3, -3)]
        for source in candidates:
            if pair.near(got, expected[source]).all():
                return source
        return None
    source = []
    for i in range(n):
        if pair.near(got[i], expected[i]).all():
            source.append(i)
            continue
        matches = [j for j in range(n) if pair.near(got[i], expected[j]).all()]
        if not matches:
            return None
        source.append(matches[0])
    return source


def _describe_move(moves: list[list[int]], meaning: str) -> str:
    """moves: per failing case, got[i] = expected[moves[i]] along the axis ``meaning``."""
    thing = {"token": "row", "row": "row", "head": "head", "group": "group"}.get(meaning, meaning)
    shifts = set()
    for source in moves:
        n = len(source)
        deltas = {(s - i) for i, s in enumerate(source)}
        wrapped = {(s - i) % n for i, s in enumerate(source)}
        if len(deltas) == 1:
            shifts.add(deltas.pop())
        elif len(wrapped) == 1:  # np.roll: the shift wraps around the end
            k = wrapped.pop()
            shifts.add(k if k <= n // 2 else k - n)
        else:
            shifts.add(None)
    if len(shifts) == 1 and None not in shifts:
        (k,) = shifts
        return (
            f"the {thing}s are shifted by {k} along that axis: {thing} i holds the right answer "
            f"of {thing} i{k:+d} (an off-by-one in an index?)"
        )
    if all(sorted(s) == list(range(len(s))) for s in moves):
        if all(s == list(range(len(s)))[::-1] for s in moves):
            return f"the {thing}s are in reverse order"
        example = moves[0]
        return (
            f"the {thing}s are in another order: {thing} i holds the right answer of {thing} "
            f"{example} (for i = 0, 1, ...)"
        )
    example = moves[0]
    i = next(i for i, s in enumerate(example) if s != i)
    return (
        f"some {thing}s hold the right answer of another {thing} (e.g. {thing} {i} holds "
        f"{thing} {example[i]}'s): an index picks the wrong {thing}"
    )


def _how(pairs: list[Pair], inputs: list[list[tuple[str, np.ndarray]]]) -> tuple[str, str]:
    """(a sentence saying how the values are wrong, the finding's key for STEPS)."""
    # the whole output equals an input, or the answer plus an input
    for index, (label, _) in enumerate(inputs[0]):
        same = [i[index][1] for i in inputs if index < len(i)]
        if len(same) != len(pairs):
            continue

        def holds(relation, same=same):
            return all(_fits(p.got, a, relation, p) for a, p in zip(same, pairs))

        if holds(lambda e, a: e + a):
            return f"your output is the right answer plus {label}", "input_added"
        if holds(lambda e, a: e - a):
            return f"your output is the right answer minus {label} (a missing residual?)", (
                "input_missing"
            )
        if holds(lambda e, a: e * a):
            return f"your output is the right answer multiplied by {label} once more", (
                "input_multiplied"
            )
    errors = sorted(
        float(np.abs(p.got - p.expected).max() / (np.abs(p.expected).max() or 1.0)) for p in pairs
    )
    relative = errors[(len(errors) - 1) // 2]  # the median case: one extreme case may be worse
    if not any(p.wrong.any() for p in pairs):  # wrong only at the checker's tighter tolerance
        return _squashed(pairs) or _precision(relative)
    wrong_got = [p.got[p.wrong] for p in pairs]
    if all(g.size and (g == 0).all() for g in wrong_got):
        return "the wrong values are all 0: they are never filled in", "zero"
    factors = [fit_factor(p.got, p.expected) for p in pairs]
    if None not in factors and all(
        p.near(c * p.expected, p.got).all() for c, p in zip(factors, pairs)
    ):
        phrase = _factor_phrase(factors, [p.layout for p in pairs])
        if phrase:
            key = "sign" if "wrong sign" in phrase else "scale"
            return f"the values {phrase}", key
    row_factors = [_per_axis_factor(p, axis=1) for p in pairs]
    if all(f is not None for f in row_factors):
        if max(float(np.abs(f - 1).max()) for f in row_factors) < 1e-2:
            return (
                "each row is off by a small factor of its own (under 1%): the per-row "
                "normaliser is computed imprecisely — a precision slip (float16 somewhere?)",
                "precision",
            )
        return (
            "each row is the right row times its own factor (the direction of every row is "
            "right, its size is not): a per-row normalisation is off",
            "row_scale",
        )
    if all(_per_axis_factor(p, axis=0) is not None for p in pairs):
        column = "vocabulary entry's logit" if pairs[0].layout.axes[-1] == "vocab" else "channel"
        return (
            f"each {column} is the right one times its own factor: a weight per {column} "
            "(a column of the output) is applied wrongly or not at all",
            "channel_scale",
        )
    shifts = [_shift(p, per_row=False) for p in pairs]
    if None not in shifts:
        return f"every value is shifted by the same constant (up to {max(shifts):.3g})", "shift"
    shifts = [_shift(p, per_row=True) for p in pairs]
    if None not in shifts:
        return "each row is the right row plus its own constant (a per-row shift)", "row_shift"
    column_shifts = [_column_shift(p) for p in pairs]
    if False not in column_shifts and True in column_shifts:
        return (
            "each column (last axis) is shifted by a constant that depends only on the column: "
            "something of that axis' size is added or subtracted (a mean over the other axis?)",
            "column_shift",
        )
    if all(_distributions(p) for p in pairs):
        return (
            "each row of your output is a probability distribution (no negative value, adding up "
            "to 1) while the right one is not: a softmax or normalisation that does not belong",
            "distribution",
        )
    if relative < 1e-2 and not all(p.wrong.mean() > 0.25 for p in pairs):
        # small errors here and there: rounding, or a function that bends the large values
        return _squashed(pairs) or _precision(relative)
    for axis, meaning in enumerate(pairs[0].layout.axes):
        if meaning == "head" and all(_same_along(p, axis) for p in pairs):
            return (
                "every head gives the same output (the heads differ in the right answer): the "
                "heads are mixed — a mean or sum over the head axis, or one head copied to all",
                "heads",
            )
    for axis, meaning in enumerate(pairs[0].layout.axes):
        moves = [_moved_along(p, axis) for p in pairs]
        if all(m is not None for m in moves) and any(m != list(range(len(m))) for m in moves):
            key = "heads" if meaning in ("head", "group") else "rows"
            return _describe_move(moves, meaning), key
    if all(
        np.allclose(np.sort(p.got, axis=None), np.sort(p.expected, axis=None), rtol=1e-3, atol=1e-5)
        for p in pairs
    ):
        return (
            "your output holds exactly the right numbers, in the wrong places: a reshape where "
            "a transpose was needed, or axes in the wrong order",
            "layout",
        )
    if relative < 1e-2:
        return _squashed(pairs) or _precision(relative)
    squashed = _squashed(pairs)
    if squashed:
        return squashed
    return f"the error is large (up to {relative:.0%} of the values' size)", "default"


def _same_along(pair: Pair, axis: int) -> bool:
    """got is the same along ``axis`` while expected is not."""
    got, expected = np.moveaxis(pair.got, axis, 0), np.moveaxis(pair.expected, axis, 0)
    if got.shape[0] < 2:
        return False
    return bool(pair.near(got, got[:1]).all()) and not pair.near(expected, expected[:1]).all()


def _precision(relative: float) -> tuple[str, str]:
    return (
        f"the values are right to about {relative:.1g} of their size but not closer: a "
        "precision slip (float16 somewhere, or a step rounded too early)",
        "precision",
    )


def _squashed(pairs: list[Pair]) -> tuple[str, str] | None:
    """Errors that grow with the value, the same way in every case (a tanh, a cap), are no
    rounding noise: the output is a bent function of the right one."""
    for p in pairs:
        e, error = p.expected.ravel(), (p.got - p.expected).ravel()
        if e.size < 4 or np.std(error) == 0 or np.std(e) == 0:
            return None
        bend = np.corrcoef(error, e**3)[0, 1]
        if not abs(bend) > 0.9:
            return None
    direction = "pulled in towards 0" if bend < 0 else "pushed away from 0"
    return (
        f"the large values are {direction} (the error grows with the value): a function is "
        "applied to each value of the output (a cap, a tanh…) that does not belong there",
        "squashed",
    )


# ------------------------------------------------------------------ which cases fail


def _cases_where(name: str, case_list: Sequence[Case], failing: list) -> tuple[str, str] | None:
    """('it fails only on ...', key of STEPS) when the failing cases are exactly those with one
    property; failing[i] is None for a case that says nothing."""
    known = [i for i, f in enumerate(failing) if f is not None]
    if all(failing[i] for i in known) or not any(failing[i] for i in known):
        return None
    properties = _case_properties(name, case_list)
    for phrase, has in properties:
        if all(has[i] == failing[i] for i in known):
            sentence = f"it fails only on the cases where {phrase} (the others pass)"
            return sentence, _CASE_STEP.get((name, phrase), "")
    return None


def _case_properties(name: str, case_list: Sequence[Case]) -> list[tuple[str, list[bool]]]:
    args = [c.args for c in case_list]
    if name == "attention":
        return [
            ("heads share kv groups (G < H)", [a[1].shape[1] < a[0].shape[1] for a in args]),
            ("keys come before the queries (T < S)", [a[0].shape[0] < a[1].shape[0] for a in args]),
            ("there are several queries (T > 1)", [a[0].shape[0] > 1 for a in args]),
            ("there are several kv groups (G > 1)", [a[1].shape[1] > 1 for a in args]),
        ]
    if name == "kv_cache_step":
        return [
            ("the cache is not empty (S > 0)", [a[3].shape[0] > 0 for a in args]),
            ("heads share kv groups (G < H)", [a[1].shape[1] < a[0].shape[1] for a in args]),
        ]
    if name == "rotary":
        return [
            (
                "the positions are not 0..T-1",
                [not np.array_equal(a[1], np.arange(len(a[1]))) for a in args],
            ),
            ("there are several heads (N > 1)", [a[0].shape[1] > 1 for a in args]),
        ]
    if name == "block":
        return [
            (
                "both halves are on (self_attention.dense and mlp.dense_4h_to_h both non-zero)",
                [not c.tags & {"mlp_only", "attention_only"} for c in case_list],
            ),
            ("heads share kv groups", [a[3] > a[4] for a in args]),
        ]
    if name == "embedding":
        return [("an id repeats", [len(set(a[0].tolist())) < len(a[0]) for a in args])]
    return []


_CASE_STEP = {
    ("attention", "heads share kv groups (G < H)"): "heads",
    ("kv_cache_step", "heads share kv groups (G < H)"): "heads",
    ("attention", "keys come before the queries (T < S)"): "after_first",
    ("block", "both halves are on (self_attention.dense and mlp.dense_4h_to_h both non-zero)"): (
        "both_halves"
    ),
    ("rotary", "the positions are not 0..T-1"): "cases",
}


# ------------------------------------------------------------------ the analysis of arrays


def _array_hint(exercise, case_list, outcomes, expected, signature: str) -> str | None:
    """Which part, which cases, where in the array and how it is wrong, then the step to
    re-read — for array outputs; None when no case can be compared."""
    output = exercise.output
    names = output.names if isinstance(output, ArraysOutput) else ("",)
    answered = [  # a case without a value says nothing
        (case, expected[i], outcomes[i].value if outcomes[i].kind == "value" else None)
        for i, case in enumerate(case_list[: len(outcomes)])
    ]
    failing_parts = _failing_parts(exercise, names, answered)
    if not failing_parts:
        return None
    findings = []
    steps = STEPS.get(exercise.name, {})
    if len(names) > 1:  # which part of a tuple output is wrong (out, cache_k, cache_v)
        wrong = [part for part, _, _ in failing_parts]
        right = [n for n in names if n not in wrong]
        sentence = f"{' and '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} wrong"
        if right:
            sentence += f" ({' and '.join(right)} {'is' if len(right) == 1 else 'are'} right)"
        findings.append(sentence)
    # a wrong cache explains a wrong out (out is computed from it), so look at the caches first
    failing_parts.sort(key=lambda found: found[0] == "out")
    part, pairs, failing_cases = failing_parts[0]
    step_keys = []
    across = _cases_where(exercise.name, case_list[: len(failing_cases)], failing_cases)
    if across:
        findings.append(across[0])
        step_keys.append(across[1])
    where = _where(pairs)
    for key in where:
        findings.append(_describe_where(key, part))
        step_keys.append(key.partition(":")[0])
    # the generic characterisations first; when they find nothing, the probes of the exercise
    inputs = [_inputs(p.case.args, p.case.names) for p in pairs]
    how = _how(pairs, inputs)
    if how[1] == "default":
        for probe in probes_for(exercise.name):
            found = probe(exercise, pairs, part)
            if found:
                how = found
                break
    findings.append(how[0])
    if how[1] != "default":  # the exercise's default step is the last resort, below "out"
        step_keys.append(how[1])
    if part == "out" and len(failing_parts) == 1:
        step_keys.append("out")  # the caches are right: the attention of the new query is not
    step = next((steps[k] for k in step_keys if k in steps), None)
    if step is None:
        step = steps.get("default", _GENERIC_STEP.format(signature=signature))
    findings.append(step)
    return "; ".join(findings)


def _failing_parts(exercise, names, answered) -> list[tuple[str, list[Pair], list]]:
    """Per output part with a wrong case: (part, its failing Pairs, per case True / False / None
    for wrong / right / nothing to compare)."""
    output = exercise.output
    failing_parts = []
    for index, part in enumerate(names):
        pairs, failing_cases = [], []
        for case, right, got in answered:
            e = right[index] if part else right
            g = _part(got, index) if part else got
            comparable = isinstance(g, np.ndarray) and g.shape == e.shape and g.dtype.kind in "fiub"
            if not comparable:
                failing_cases.append(None)
                continue
            e64, g64 = e.astype(np.float64), g.astype(np.float64)
            if not (np.isfinite(g64).all() and np.isfinite(e64).all()):
                failing_cases.append(None)  # NaN and inf have their own hint
                continue
            if output.close(right, got) if not part else _part_close(output, index, e, g):
                failing_cases.append(False)
                continue
            failing_cases.append(True)
            pairs.append(
                Pair(
                    case,
                    e64,
                    g64,
                    layout_of(exercise.name, part, case.args),
                    output.atol,
                    output.rtol,
                )
            )
        if pairs:
            failing_parts.append((part, pairs, failing_cases))
    return failing_parts


def returned_input(exercise, case: Case, got) -> str | None:
    """When an output (or one part of a tuple output) is an input returned unchanged, whatever
    its shape: 'the returned cache_k is the input cache_k, unchanged'. Never raises."""
    try:
        return _returned_input(exercise, case, got)
    except Exception:  # an output too strange to compare is left to the other hints
        return None


def _returned_input(exercise, case: Case, got) -> str | None:
    output = exercise.output
    names = output.names if isinstance(output, ArraysOutput) else ("",)
    for index, part in enumerate(names):
        value = _part(got, index) if part else got
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            continue
        for name, given in zip(case.names, case.args):
            same = (
                isinstance(given, np.ndarray)
                and given.shape == value.shape
                and np.array_equal(given, value)
            )
            if same:
                what = f"the returned {part}" if part else "your output"
                hint = f"{what} is the input {name}, unchanged"
                if part.startswith("cache"):
                    hint += ": append the new token's row (the rotated key, the value) to it"
                return hint
    return None


def _part(value, index):
    if isinstance(value, (tuple, list)) and len(value) > index:
        return value[index]
    return None


def _part_close(output: ArraysOutput, index: int, e, g) -> bool:
    return output._parts()[index].close(e, g)


# ------------------------------------------------------------------ top_p: the set


def _set_hint(case_list, outcomes, expected) -> str | None:
    """Compare the kept set with the probability order of each failing case."""
    notes = []
    for i, case in enumerate(case_list[: len(outcomes)]):
        if outcomes[i].kind != "value":
            continue
        got = _as_id_set(outcomes[i].value)
        if got is None:
            return None
        if got == expected[i]:
            continue
        logits, p = case.args
        probs = softmax_1d(logits)
        order = np.argsort(-logits, kind="stable")  # most likely first
        rank = {int(t): r for r, t in enumerate(order)}
        n = len(expected[i])
        ranks = sorted(rank[t] for t in got if t in rank)
        outside = sorted(t for t in got if t not in rank)
        notes.append((case, got, n, ranks, outside, probs, order, p))
    if not notes:
        return None
    case, got, n, ranks, outside, probs, order, p = notes[0]
    label = f"on case “{case.label}”"
    if outside:
        return (
            f"{label} you keep ids {outside[:5]} that are not token ids (0..V-1): return the "
            "ids of the kept tokens"
        )
    if not got:
        return f"{label} you keep no token: top-p always keeps at least the most likely one"
    if all(set(g) == set(range(len(g))) for _, g, *_ in notes) and any(
        set(o[: len(g)].tolist()) != set(g) for _, g, _, _, _, _, o, _ in notes
    ):
        return (
            "the ids you keep are always 0, 1, 2, ...: positions in the sorted order, not token "
            "ids — keep order[:n], the ids of the n most likely tokens"
        )
    kept_mass = float(sum(probs[order[r]] for r in ranks))
    if ranks == list(range(len(ranks))):  # a prefix of the probability order: the count is off
        m = len(ranks)
        if m == n - 1:
            where = (
                "the boundary token (the one whose probability makes the total reach p) is missing"
            )
        elif m == n + 1:
            where = "one token past the boundary is kept: the total had already reached p"
        elif m > n:
            where = f"{m - n} tokens past the boundary are kept (the tail)"
        else:
            where = f"{n - m} of the most likely tokens up to the boundary are missing"
        if m < n and kept_mass < p:
            rule = (
                f"your tokens add up to only {kept_mass:.4g} < p, yet you stopped: either the "
                "stop comes too early or the numbers you add are not the probabilities "
                "softmax(logits) (they must add up to 1 over the whole vocabulary)"
            )
        else:
            rule = (
                f"your tokens add up to {kept_mass:.4g}. Re-read the stopping rule: keep "
                "tokens, most likely first, up to and including the one that makes the running "
                "total reach p"
            )
        return (
            f"{label} you keep the {m} most likely tokens (the right order) but the smallest "
            f"set reaching p = {p:g} has {n}: {where}; {rule}"
        )
    right = set(range(n))
    missing = sorted(right - set(ranks))
    extra = sorted(set(ranks) - right)
    tail = [r for r in extra if r >= len(order) // 2]
    return (
        f"{label} your set is not the most likely tokens: it misses the tokens ranked "
        f"{missing[:6]} by probability (0 = most likely) and keeps tokens ranked {extra[:6]}"
        + (" from the tail" if tail else "")
        + f"; your tokens add up to {kept_mass:.4g}. Re-read the order: sort by probability, "
        "most likely first, and take ids from that order"
    )


# ------------------------------------------------------------------ entry point


def structural_hint(
    exercise, case_list: Sequence[Case], outcomes: Sequence, expected: Sequence
) -> str | None:
    """Where and how the student's outputs are wrong, or None when they cannot be analysed.
    ``expected`` holds the right answer of every case."""
    try:
        with np.errstate(all="ignore"):
            if isinstance(exercise.output, IdSetOutput):
                return _set_hint(case_list, outcomes, expected)
            return _array_hint(exercise, case_list, outcomes, expected, exercise.signature)
    except Exception:  # an output too strange to analyse must not break the check
        return None
