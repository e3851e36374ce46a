"""Probes: the right layer with one thing changed in a structural way — an input in another's
place, the scores' scale, the rotation angle, the activation, the position — tried when the
generic characterisations (structure.py) find nothing. Each takes the failing pairs of one output
part and gives (finding, key of structure.STEPS) or None.

Shape legend: T tokens · S cached + new · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab.
"""

from __future__ import annotations

import numpy as np

from glm_numpy.exercises import references
from glm_numpy.exercises.evidence import Pair, all_near, fit_factor, named_factor


def probe_inputs_swapped(exercise, pairs: list[Pair], part: str):
    """The right function given one input where another belongs (k for v, x for weight…)."""
    case = pairs[0].case
    arrays = [i for i, a in enumerate(case.args) if isinstance(a, np.ndarray) and a.ndim > 0]
    index = exercise.output.names.index(part) if part else None

    def run(pair, i, j, exchange):
        args = list(pair.case.args)
        if args[i].shape != args[j].shape:
            return None
        args[j], args[i] = args[i], (args[j] if exchange else args[i])
        out = exercise.reference(*args)
        return out[index] if part else out

    for i in arrays:
        for j in arrays:
            if i == j:
                continue
            a, b = case.names[i], case.names[j]
            if i < j and all_near(pairs, lambda p, i=i, j=j: run(p, i, j, True)):
                return f"your output is the right answer with {a} and {b} exchanged", "swapped"
            if all_near(pairs, lambda p, i=i, j=j: run(p, i, j, False)):
                return f"your output is the right answer computed with {a} where {b} belongs", (
                    "swapped"
                )
    return None


def _decode_parts(args, query_shift=0, key_shift=0, score_factor=1.0):
    """The reference decode step with the query / the new key rotated `shift` positions away
    from S and the scores multiplied by `score_factor` -> (out, cache_k, cache_v)."""
    q, k, v, cache_k, cache_v = args
    S, _, Dh = cache_k.shape
    q = references.rotary(q, np.array([S + query_shift]))
    keys = np.concatenate([cache_k, references.rotary(k, np.array([S + key_shift]))])
    values = np.concatenate([cache_v, v])
    out = references.attention((q * np.float32(score_factor)).astype(np.float32), keys, values)
    return out, keys, values


def _probe_score_scale(exercise, pairs: list[Pair], part: str):
    """attention / kv out: attention with the scores scaled by another size (1/sqrt(H·Dh),
    1/Dh, not at all), possibly with the output multiplied by a factor too."""
    if part not in ("", "out"):
        return None

    def attention_with(args, factor):
        if exercise.name == "attention":
            q, k, v = args
            return references.attention((q * np.float32(factor)).astype(np.float32), k, v)
        return _decode_parts(args, score_factor=factor)[0]

    options = [("not scaled", lambda sizes: 1.0)]
    for label in pairs[0].layout.sizes:
        for shown, scale in ((label, float), (f"sqrt({label})", np.sqrt)):
            options.append((f"divided by {shown}", lambda sz, lb=label, f=scale: 1 / f(sz[lb])))
            options.append((f"multiplied by {shown}", lambda sz, lb=label, f=scale: f(sz[lb])))
    for said, wanted in options:
        # the reference divides by sqrt(Dh): multiplying q by wanted·sqrt(Dh) gives `wanted`
        factors = [wanted(p.layout.sizes) * np.sqrt(p.layout.sizes["Dh"]) for p in pairs]
        if all(abs(f - 1) < 1e-6 for f in factors):
            continue
        variants = [attention_with(p.case.args, f) for f, p in zip(factors, pairs)]
        if all(p.near(v, p.got).all() for v, p in zip(variants, pairs)):
            return (
                f"your output equals attention with the scores q·k {said} instead of divided "
                "by sqrt(Dh)",
                "scores",
            )
        outputs = [fit_factor(p.got, v.astype(np.float64)) for v, p in zip(variants, pairs)]
        if None in outputs or not all(
            p.near(c * v, p.got).all() for c, v, p in zip(outputs, variants, pairs)
        ):
            continue
        named = named_factor(outputs, [p.layout for p in pairs])
        times = f"× {named}" if named else f"× {outputs[0]:.3g}"
        return (
            f"your output equals attention with the scores q·k {said}, then the result {times}: "
            "the only scale is 1/sqrt(Dh), on the scores, before the softmax",
            "scores",
        )
    return None


def _probe_attention_weights(exercise, pairs: list[Pair], part: str):
    """attention / kv out: each query's output is one key's value (all the weight on one key) or
    the plain mean of the values (all keys weighted alike)."""
    if part not in ("", "out"):
        return None
    picks, uniform = set(), []
    for pair in pairs:
        args = pair.case.args
        q = args[0]
        if exercise.name == "attention":
            values = args[2]
        else:
            values = np.concatenate([args[4], args[2]])  # [S+1, G, Dh]
        T, H = q.shape[:2]
        S, G = values.shape[:2]
        per_head = values.astype(np.float64)[:, np.arange(H) // (H // G)]  # [S, H, Dh]
        seen_mean = np.empty_like(pair.got)
        for t in range(T):
            position = S - T + t
            seen_mean[t] = per_head[: position + 1].mean(axis=0)
            for h in range(H):
                hits = [s for s in range(S) if pair.near(pair.got[t, h], per_head[s, h]).all()]
                if position == 0 and hits[:1] == [0]:
                    continue  # key 0 is the query's own key: either reading fits
                if not hits:
                    picks.add(None)
                elif hits[0] == 0 and position > 0:
                    picks.add("key 0, the first position")
                elif hits[0] == position:
                    picks.add("its own key")
                else:
                    picks.add(None)
        uniform.append(pair.near(pair.got, seen_mean).all())
    if len(picks) == 1 and None not in picks:
        (which,) = picks
        return (
            f"each query's output is exactly the value of {which}: its softmax puts all the "
            "weight on that one key (a mask that hides the other keys, or scores that are far "
            "too large)",
            "one_key",
        )
    if all(uniform):
        return (
            "each query's output is the plain mean of the values it may see: every key gets the "
            "same weight, as if the scores q·k were all equal",
            "scores",
        )
    return None


def _probe_recovered_weights(exercise, pairs: list[Pair], part: str):
    """attention / kv out: each query's output is a weighted sum of the value rows of its head's
    group, out = Σ_s p_s v_s; while S < Dh the weights p can be read back exactly (least squares)
    and compared with the right causal softmax weights."""
    if part not in ("", "out"):
        return None
    seen = []  # per (case, query, head): (weights, right weights, allowed keys, fits)
    for pair in pairs:
        args = pair.case.args
        if exercise.name == "attention":
            values = args[2]
        else:
            values = np.concatenate([args[4], args[2]])  # [S+1, G, Dh]
        T, H = args[0].shape[:2]
        S, G, Dh = values.shape
        if not 1 < S < Dh:
            continue
        per_head = values.astype(np.float64)[:, np.arange(H) // (H // G)]  # [S, H, Dh]
        allowed = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]  # [T, S]
        for t in range(T):
            for h in range(H):
                basis = per_head[:, h, :].T  # [Dh, S]
                weights, *_ = np.linalg.lstsq(basis, pair.got[t, h], rcond=None)
                right, *_ = np.linalg.lstsq(basis, pair.expected[t, h], rcond=None)
                fits = np.allclose(basis @ weights, pair.got[t, h], atol=1e-4, rtol=1e-3)
                seen.append((weights, right, allowed[t], fits))
    if not seen:
        return None
    if not all(fits for *_, fits in seen):
        return (
            "your output is not a weighted sum of the value rows: the last step is weights @ v, "
            "with v of the head's own kv group",
            "values",
        )
    totals = np.array([w.sum() for w, *_ in seen])
    future = any(np.abs(w[~a]).max(initial=0) > 1e-4 for w, _, a, _ in seen)
    blind = any(((np.abs(w) < 1e-6) & (r > 1e-4) & a).any() for w, r, a, _ in seen)
    if (np.array([w.min() for w, *_ in seen]) < -1e-4).any():
        return (
            "some of the weights your queries give the values are negative: the scores are used "
            "as weights without the softmax (exp, then divide by the sum)",
            "row_scale",
        )
    if future or blind:
        what = []
        if future:
            what.append("give weight to later positions")
        if blind:
            what.append("give no weight to earlier keys they may see")
        return (
            f"reading the weights back from your output, queries {' and '.join(what)}: the "
            "causal mask is wrong (query t at position S - T + t sees keys 0..S-T+t)",
            "after_first",
        )
    if not np.allclose(totals, 1, atol=1e-3):
        shown = (
            f"{totals.min():.3g}"
            if np.ptp(totals) < 1e-3
            else f"{totals.min():.3g} to {totals.max():.3g}"
        )
        return (
            f"reading the weights back from your output, each query's weights add up to {shown} "
            "instead of 1: the softmax's normalisation is missing, or something rescales the "
            "weights after it (a scale or a mask belongs before the softmax)",
            "row_scale",
        )
    return (
        "reading the weights back from your output, each query weighs the right keys and its "
        "weights add up to 1, but they are not the right ones: the softmax is taken of the wrong "
        "scores — check q·k (the head's own query, its group's keys) and the scale 1/sqrt(Dh)",
        "scores",
    )


def _probe_rotation(exercise, pairs: list[Pair], part: str):
    """rotary: compare each output pair (2i, 2i+1) with the input pair: its length (a rotation
    keeps it) and the angle it turned by, against positions[t]·θᵢ."""
    turned, wanted, positions, frequencies = [], [], [], []
    for pair in pairs:
        x, given_positions = pair.case.args
        R = x.shape[-1] // 2
        x64 = x.astype(np.float64)
        a, b = x64[..., 0:R:2], x64[..., 1:R:2]  # [T, N, R/2]
        c, d = pair.got[..., 0:R:2], pair.got[..., 1:R:2]
        length_in, length_out = np.hypot(a, b), np.hypot(c, d)
        if not np.allclose(length_in, length_out, rtol=1e-3, atol=1e-4):
            return (
                "the rotated pairs change length, so they are not rotated: each output pair "
                "must be (x[2i]·cos − x[2i+1]·sin, x[2i+1]·cos + x[2i]·sin) of the ORIGINAL "
                "x[2i], x[2i+1] (a channel overwritten in place before it is read, or cos and "
                "sin mixed in one formula, changes the length)",
                "odd",
            )
        theta = 10000.0 ** (-np.arange(0, R, 2) / R)  # [R/2]
        angle = np.arctan2(d, c) - np.arctan2(b, a)  # [T, N, R/2]
        turned.append(angle[length_in > 1e-3])
        right = given_positions.astype(np.float64)[:, None, None] * theta  # [T, 1, R/2]
        wanted.append(np.broadcast_to(right, angle.shape)[length_in > 1e-3])
        positions.append(np.broadcast_to(given_positions[:, None, None], angle.shape))
        frequencies.append(np.broadcast_to(theta, angle.shape)[length_in > 1e-3])
    turned, wanted, theta = (np.concatenate(v) for v in (turned, wanted, frequencies))

    def same_angle(a, b):
        return bool(np.all(np.abs(np.angle(np.exp(1j * (a - b)))) < 2e-2))

    if same_angle(turned, wanted):  # the pairs are right: the error is elsewhere
        return None
    if same_angle(turned, -wanted):
        return "every pair turns by minus the right angle: the rotation goes the wrong way", "sign"
    if same_angle(turned, np.pi / 2 - wanted):
        return (
            "every pair turns by 90° minus the right angle: cos and sin are exchanged",
            "rotated",
        )
    for shift in (1, -1, 2, -2):
        if same_angle(turned, wanted + shift * theta):
            return (
                f"every pair turns by the angle of position positions[t]{shift:+d}: the "
                "positions are off by "
                + ("one" if abs(shift) == 1 else str(abs(shift)))
                + " (they count from 0 and are used as given)",
                "cases",
            )
    return (
        "every pair keeps its length (it is a rotation) but turns by the wrong angle",
        "angle",
    )


def _probe_activation(exercise, pairs: list[Pair], part: str):
    """swiglu: recover the [T, F] activation h from out = h @ w_4h_to_h.T (exact while D >= F)
    and compare it with silu(gate) * up."""
    found = None
    samples = []
    for pair in pairs:
        x, w_up, w_down = (a.astype(np.float64) for a in pair.case.args)
        u = x @ w_up.T
        F = u.shape[1] // 2
        gate, up = u[:, :F], u[:, F:]
        silu = gate / (1 + np.exp(-gate))
        h, *_ = np.linalg.lstsq(w_down, pair.got.T, rcond=None)  # [F, T]
        h = h.T
        if not np.allclose(h @ w_down.T, pair.got, rtol=1e-6, atol=1e-6):
            # not a product with w_4h_to_h.T; with the right h, is it a product with another
            # matrix? (only a case with more tokens than F can tell)
            if x.shape[0] <= F:
                continue
            m, *_ = np.linalg.lstsq(silu * up, pair.got, rcond=None)  # [F, D]
            which = "down" if np.allclose((silu * up) @ m, pair.got, atol=1e-4) else "other"
            if found not in (None, which):
                return None
            found = which
            continue
        options = [
            ("h_right", silu * up),
            ("added", silu + up),
            ("no_up", silu),
            ("no_gate", up),
            ("swapped", up / (1 + np.exp(-up)) * gate),
        ]
        which = next((k for k, v in options if np.allclose(h, v, rtol=1e-3, atol=1e-4)), None)
        if which is None:
            usable = np.abs(up) > 0.3
            ratio = np.where(usable, h / np.where(usable, up, 1), np.nan)
            if not np.allclose(ratio[usable], silu[usable], rtol=1e-3, atol=1e-4):
                which = "activation"
                for g, r, s_ in zip(gate[usable], ratio[usable], silu[usable]):
                    samples.append((g, r, s_))
            else:
                which = "other"
        if found not in (None, which):
            return None
        found = which
    if found == "activation" and not _a_function_of_gate(samples):
        found = "other"
    if found in ("h_right", "down"):
        return (
            "silu(gate) * up is right, so the last step is wrong: out = (silu(gate) * up) @ "
            "w_4h_to_h.T",
            "down",
        )
    if found == "added":
        return "silu(gate) and up are added; they are multiplied: silu(gate) * up", "combine"
    if found == "no_up":
        return "up is not used: the product is silu(gate) * up", "combine"
    if found == "no_gate":
        return "the gate is not used: the product is silu(gate) * up", "combine"
    if found == "swapped":
        return "silu is applied to up and multiplied by the gate: it is silu(gate) * up", "combine"
    if found == "activation":
        samples.sort(key=lambda s: s[0])
        picked = [samples[0], samples[len(samples) // 2], samples[-1]]
        shown = "; ".join(f"gate {g:.2f}: yours {r:.3f}, silu {s:.3f}" for g, r, s in picked)
        return (
            f"up is multiplied in correctly but the gate's activation is wrong ({shown}): "
            "silu(z) = z * sigmoid(z) = z / (1 + exp(-z))",
            "activation",
        )
    return None


def _a_function_of_gate(samples: list[tuple[float, float, float]]) -> bool:
    """Whether the activation values read off (gate, yours, silu) depend on the gate alone:
    nearly equal gates must give nearly equal values."""
    ordered = sorted(samples)
    close = [
        (a, b) for a, b in zip(ordered, ordered[1:]) if abs(a[0] - b[0]) < 0.05
    ]  # neighbours in gate
    if not close:
        return True
    jumps = [abs(a[1] - b[1]) > 0.05 + 0.05 * abs(a[1]) for a, b in close]
    return sum(jumps) <= 0.2 * len(jumps)


def _probe_normalised_input(exercise, pairs: list[Pair], part: str):
    """swiglu / lm_head: the right layer applied to x normalised (a norm borrowed from the
    block or the model)."""

    norms = {
        "x / sqrt(mean(x²))": lambda x: np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5),
        "x / |x|": lambda x: np.linalg.norm(x, axis=-1, keepdims=True),
    }

    def normalised(args, norm):
        x = args[0].astype(np.float64)
        return exercise.reference((x / norm(x)).astype(np.float32), *args[1:])

    for shown, norm in norms.items():
        if all_near(pairs, lambda p, n=norm: normalised(p.case.args, n)):
            return (
                f"your output equals the right answer for x normalised ({shown}): x is "
                "normalised before it gets here",
                "normalised_input",
            )
    return None


def _probe_decode_positions(exercise, pairs: list[Pair], part: str):
    """kv_cache_step: the query or the new key rotated at another position than S, or the new row
    of a cache holding another input."""
    if part == "out":
        for shift in (-1, 1, 2):
            if all_near(pairs, lambda p, s=shift: _decode_parts(p.case.args, query_shift=s)[0]):
                return f"the query is rotated at position S{shift:+d}; it sits at S", "position"
        return None
    index = exercise.output.names.index(part)
    for shift in (-1, 1, 2):
        if all_near(pairs, lambda p, s=shift: _decode_parts(p.case.args, key_shift=s)[index]):
            return f"the new key is rotated at position S{shift:+d}; it sits at S", "position"
    for name, position in zip(pairs[0].case.names, range(3)):
        if all_near(
            pairs,
            lambda p, i=position: np.concatenate([p.case.args[3 + index - 1], p.case.args[i]]),
        ):
            return f"the new row of {part} is the input {name}", "new"
    return None


def _probe_embedding_rows(exercise, pairs: list[Pair], part: str):
    """Each output row is some row of the table: say which ids were really looked up."""
    offsets = set()
    for p in pairs:
        ids, table = p.case.args
        table64 = table.astype(np.float64)
        for t, row in enumerate(p.got):
            matches = np.flatnonzero(p.near(row[None, :], table64).all(axis=1))
            if len(matches) == 0:
                return None
            V = table.shape[0]
            offset = (int(matches[0]) - int(ids[t])) % V  # id -1 wraps to the last row
            offsets.add(offset if offset <= V // 2 else offset - V)
    if offsets == {0}:
        return None
    if len(offsets) == 1:
        (k,) = offsets
        return (
            f"every row is a row of the table, but row ids[t]{k:+d} instead of row ids[t] (ids "
            "count from 0, and index the rows directly)",
            "rows",
        )
    return (
        "every row is a row of the table, but not row ids[t]: the rows are taken in another "
        "order or for other ids (out[t] = table[ids[t]], in the order of ids)",
        "rows",
    )


PROBES = {
    "embedding": [_probe_embedding_rows],
    "rotary": [_probe_rotation],
    "attention": [_probe_score_scale, _probe_attention_weights],
    "swiglu": [_probe_normalised_input, _probe_activation],
    "lm_head": [_probe_normalised_input],
    "kv_cache_step": [_probe_decode_positions, _probe_score_scale, _probe_attention_weights],
}
# the broadest probes, tried after an input in another's place (probe_inputs_swapped)
LATE_PROBES = {
    "attention": [_probe_recovered_weights],
    "kv_cache_step": [_probe_recovered_weights],
}


def probes_for(name: str) -> list:
    """The probes of exercise ``name``, most specific first."""
    return [*PROBES.get(name, []), probe_inputs_swapped, *LATE_PROBES.get(name, [])]
