"""Looking inside the model, and changing what it computes, with hooks (glm_numpy.hooks).

    logit_lens(model, tokenizer, text)        what each layer's residual stream would predict
    ablate_heads(model, ids, {3: [0, 5]})     logits with those heads' contributions removed
    patch(model, clean, corrupt, name, ...)   activation patching: which activations carry the
                                              difference between two prompts
    first_divergence(trace_a, trace_b)        where two runs first part (a bug, a quantisation)

Each is a few hooks around ``model.forward``: the forward pass itself is never copied here.
Shape legend: T tokens, H heads, Dh head dim, V vocabulary rows, L layers, P hook points.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from glm_numpy.hooks import matching_points
from glm_numpy.layers import lm_head, rms_norm


def keeping(names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict]:
    """-> (kept, hooks): hooks that keep what the named points see in `kept`."""
    kept: dict[str, np.ndarray] = {}
    hooks = {name: (lambda array, name=name: kept.__setitem__(name, array)) for name in names}
    return kept, hooks


# ---------------------------------------------------------------------------- logit lens
@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Per residual stream (after the embedding, after each layer), the top next tokens."""

    stages: list[str]  # "embedding", "layers.0", ..., "layers.{L-1}"
    tokens: list[str]  # the input's token pieces [T]
    top_ids: np.ndarray  # [L+1, T, k] int
    top_probs: np.ndarray  # [L+1, T, k] float
    top_tokens: list[list[list[str]]]  # [L+1][T][k] pieces

    def format(self, position: int = -1) -> str:
        """A table: one row per stage, the top tokens predicted after token `position`."""
        t = range(len(self.tokens))[position]
        lines = [f"next-token predictions after token {t} {self.tokens[t]!r}:"]
        width = max(len(s) for s in self.stages)
        for s, stage in enumerate(self.stages):
            cells = (
                f"{tok!r} {p:.2f}" for tok, p in zip(self.top_tokens[s][t], self.top_probs[s, t])
            )
            lines.append(f"{stage:<{width}}  " + "  ".join(cells))
        return "\n".join(lines)


def logit_lens(model, tokenizer, text: str, top_k: int = 5) -> LogitLens:
    """Decode every residual stream as if it were the last: final norm + output layer.

    The last stage ('layers.{L-1}') is the model's own prediction. Ids the tokenizer has no text
    for (padding rows of the vocabulary) are never shown.
    """
    ids = np.asarray(tokenizer.encode(text))
    stages = ["embedding"] + [f"layers.{i}" for i in range(model.config.num_layers)]
    names = ["embedding"] + [f"{stage}.output" for stage in stages[1:]]
    kept, hooks = keeping(names)
    model.forward(ids, hooks=hooks)
    streams = np.stack([kept[name] for name in names])  # [L+1, T, D]
    h = rms_norm(streams, model.final_layernorm, model.config.layernorm_epsilon)
    logits = lm_head(h, model.output_layer)[..., : tokenizer.vocab_size]  # [L+1, T, V]
    probs = softmax(logits)
    top_ids = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]  # [L+1, T, k]
    top_tokens = [[tokenizer.pieces(row) for row in stage] for stage in top_ids]
    return LogitLens(
        stages,
        tokenizer.pieces(ids),
        top_ids,
        np.take_along_axis(probs, top_ids, axis=-1),
        top_tokens,
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> probabilities [..., V] along the last axis."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- head ablation
def ablate_heads(model, ids, heads: Mapping[int, Sequence[int]]) -> np.ndarray:
    """ids [T] -> logits [T, V] with the given heads of each layer removed: their slices of the
    attention context (the input of `dense`) set to zero, so they add nothing to the stream."""
    c = model.config
    hooks = {}
    for layer, layer_heads in heads.items():
        if not 0 <= layer < c.num_layers:
            raise ValueError(f"layer {layer}: this model has layers 0..{c.num_layers - 1}")
        bad = [h for h in layer_heads if not 0 <= h < c.num_attention_heads]
        if bad:
            raise ValueError(
                f"layer {layer}: no head {bad[0]} (heads 0..{c.num_attention_heads - 1})"
            )
        hooks[f"layers.{layer}.attention.context"] = zeroing_heads(list(layer_heads), c.head_dim)
    return model.forward(np.asarray(ids), hooks=hooks)


def zeroing_heads(heads: list[int], head_dim: int):
    """A hook on attention.context [T, H·Dh] (head h at columns h·Dh..(h+1)·Dh) that zeroes
    the given heads."""

    def hook(context: np.ndarray) -> np.ndarray:
        context = context.reshape(context.shape[0], -1, head_dim).copy()  # [T, H, Dh]
        context[:, heads] = 0
        return context.reshape(context.shape[0], -1)

    return hook


# ---------------------------------------------------------------------------- activation patching
@dataclasses.dataclass(frozen=True)
class Patching:
    """The corrupt run with one activation (one point, one position) taken from the clean run,
    measured by the logit difference answer - foil at the last position."""

    points: list[str]  # [P] the patched hook points
    effect: np.ndarray  # [P, T] logit difference after patching point p at position t
    clean: float  # the logit difference of the clean run
    corrupt: float  # ... and of the corrupt run, unpatched

    @property
    def recovered(self) -> np.ndarray:
        """[P, T]: the share of the clean-vs-corrupt difference a patch restores (1 = all)."""
        return (self.effect - self.corrupt) / (self.clean - self.corrupt)


def patch(
    model,
    clean_ids,
    corrupt_ids,
    name: str,
    answer: int,
    foil: int,
) -> Patching:
    """Activation patching over every point `name` matches (e.g. "layers.*.output") and every
    position: does this activation, at this position, carry what makes the clean prompt favour
    `answer` over `foil`? clean_ids and corrupt_ids [T] must have the same length."""
    clean_ids, corrupt_ids = np.asarray(clean_ids), np.asarray(corrupt_ids)
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(
            f"clean_ids {clean_ids.shape} and corrupt_ids {corrupt_ids.shape}: patching needs "
            "prompts of the same length, position by position"
        )
    points = matching_points(name, model.config.num_layers)
    clean, hooks = keeping(points)
    clean_logits = model.forward(clean_ids, hooks=hooks)

    def logit_difference(logits: np.ndarray) -> float:
        return float(logits[-1, answer] - logits[-1, foil])

    effect = np.empty((len(points), clean_ids.size))
    for p, point in enumerate(points):
        for t in range(clean_ids.size):
            hook = replacing_position(clean[point], t, position_axis(point))
            effect[p, t] = logit_difference(model.forward(corrupt_ids, hooks={point: hook}))
    _, watching = keeping(points)  # hooks: the same (readable) path as the patched runs
    corrupt = logit_difference(model.forward(corrupt_ids, hooks=watching))
    return Patching(points, effect, logit_difference(clean_logits), corrupt)


def position_axis(point: str) -> int:
    """The token axis of a hook point's array: scores and probs are [H, T, S], the rest [T, ...]."""
    return 1 if point.endswith(("scores", "probs")) else 0


def replacing_position(source: np.ndarray, t: int, axis: int):
    """A hook that takes position t (along `axis`) from `source`, the rest from its own run."""

    def hook(array: np.ndarray) -> np.ndarray:
        array = array.copy()
        index = (slice(None),) * axis + (t,)
        array[index] = source[index]
        return array

    return hook


# ---------------------------------------------------------------------------- first divergence
@dataclasses.dataclass(frozen=True)
class Divergence:
    """Where run b first leaves run a (the reference) beyond tolerance."""

    name: str  # the first trace entry, in computation order, that differs
    index: tuple[int, ...]  # its worst element (furthest beyond tolerance)
    value_a: float
    value_b: float
    relative_error: float  # |b - a| / |a| at that element
    layers: list[tuple[str, float]]  # per stage: the largest normwise relative error

    def __str__(self) -> str:
        return (
            f"first divergence: {self.name}{list(self.index)}: a={self.value_a:.6g} "
            f"b={self.value_b:.6g} (relative error {self.relative_error:.3g})\n"
            + format_layer_errors(self.layers)
        )


def first_divergence(
    trace_a: Mapping[str, np.ndarray],
    trace_b: Mapping[str, np.ndarray],
    rtol: float = 1e-3,
    atol: float = 1e-5,
) -> Divergence | None:
    """The first entry (in trace_a's order, the order computed) where |b - a| > atol + rtol·|a|
    somewhere; None when the two traces agree everywhere."""
    for name, a in trace_a.items():
        b = matching_entry(trace_b, name, a)
        with np.errstate(invalid="ignore"):  # inf - inf
            excess = np.abs(b - a) / (atol + rtol * np.abs(a))  # > 1: beyond tolerance
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        excess = np.where(same, 0, np.nan_to_num(excess, nan=np.inf))
        if excess.max() > 1:
            index = np.unravel_index(np.argmax(excess), a.shape)
            value_a, value_b = float(a[index]), float(b[index])
            relative = abs(value_b - value_a) / abs(value_a) if value_a else float("inf")
            return Divergence(
                name,
                tuple(int(i) for i in index),
                value_a,
                value_b,
                relative,
                layer_errors(trace_a, trace_b),
            )
    return None


def matching_entry(trace_b: Mapping[str, np.ndarray], name: str, a: np.ndarray) -> np.ndarray:
    if name not in trace_b:
        raise ValueError(f"trace_b has no {name!r}: the two traces come from different models")
    b = np.asarray(trace_b[name])
    if b.shape != a.shape:
        raise ValueError(f"{name!r} has shape {a.shape} in trace_a but {b.shape} in trace_b")
    return b


def stage_of(name: str) -> str:
    """'layers.3.mlp_act' -> 'layers.3'; 'positions', 'embedding' -> 'embedding'; the final
    norm and the logits -> 'final'."""
    if name.startswith("layers."):
        return ".".join(name.split(".")[:2])
    return "embedding" if name in ("positions", "embedding") else "final"


def layer_errors(trace_a, trace_b) -> list[tuple[str, float]]:
    """[(stage, error)]: per stage, the largest normwise relative error max|b - a| / max|a| of
    its entries — how a difference grows through the layers."""
    errors: dict[str, float] = {}
    for name, a in trace_a.items():
        a = np.asarray(a, dtype=np.float64)
        b = matching_entry(trace_b, name, a)
        scale = np.abs(a).max()
        error = float(np.abs(b - a).max() / scale) if scale else float(np.abs(b).max())
        stage = stage_of(name)
        errors[stage] = max(errors.get(stage, 0.0), error)
    return list(errors.items())


def format_layer_errors(layers: list[tuple[str, float]]) -> str:
    width = max(len(stage) for stage, _ in layers)
    lines = [f"{'stage':<{width}}  max |b - a| / max |a|"]
    lines += [f"{stage:<{width}}  {error:.3e}" for stage, error in layers]
    return "\n".join(lines)
