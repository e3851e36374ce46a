"""Hook points: every intermediate of the forward pass, under its trace name, open to a function.

    model.forward(ids, hooks={"layers.3.attention.context": fn})

``fn(array)`` sees one sequence's intermediate (shaped as in the trace, e.g. context [T, H·Dh])
and returns either None (keep it) or a replacement of the same shape, which the rest of the pass
then uses. A name may be a pattern: ``*`` stands for any text within one dotted part
(``layers.*.attention.context``), ``**`` for any text (``layers.3.**``). Names are checked
against the model's hook points, and an unknown one is an error listing near matches.

The trace is itself a hook: ``trace=True`` adds, after the user's hooks, one at every point that
keeps what it sees (so the trace holds the values the rest of the pass used). In a batch, a hook
is called once per row. ``hook_points(L)`` lists the points in computation order;
docs/architecture.md gives each one's shape.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Mapping

import numpy as np

Hook = Callable[[np.ndarray], "np.ndarray | None"]

BEFORE_LAYERS = ("positions", "embedding")
IN_EACH_LAYER = (
    "input",
    "input_layernorm",
    "attention.q",
    "attention.k",
    "attention.v",
    "attention.q_rotary",
    "attention.k_rotary",
    "attention.scores",
    "attention.probs",
    "attention.context",
    "attention.output",
    "residual_attention",
    "post_attention_layernorm",
    "mlp_gate",
    "mlp_up",
    "mlp_act",
    "mlp_output",
    "output",
)
AFTER_LAYERS = ("final_layernorm", "logits")


@functools.lru_cache(maxsize=8)
def hook_points(num_layers: int) -> tuple[str, ...]:
    """Every hook point of a model with num_layers layers, in computation order."""
    in_layers = (f"layers.{i}.{point}" for i in range(num_layers) for point in IN_EACH_LAYER)
    return (*BEFORE_LAYERS, *in_layers, *AFTER_LAYERS)


def resolve_hooks(hooks: Mapping[str, Hook], num_layers: int) -> dict[str, list[Hook]]:
    """{name or pattern: fn} -> {hook point: [fn, ...]} (in the order given); raises a
    ValueError naming an unknown point (with near matches) or a pattern that matches none."""
    if not isinstance(hooks, Mapping):
        raise TypeError(f"hooks must be a dict {{name or pattern: function}}, got {hooks!r}")
    table: dict[str, list[Hook]] = {}
    for pattern, fn in hooks.items():
        if not callable(fn):
            raise TypeError(f"hook {pattern!r}: expected a function of one array, got {fn!r}")
        for point in matching_points(pattern, num_layers):
            table.setdefault(point, []).append(fn)
    return table


def matching_points(pattern: str, num_layers: int) -> list[str]:
    """The hook points a name or pattern (pattern_regex) names, in computation order; a
    ValueError with near matches when it names none."""
    points = hook_points(num_layers)
    matches = pattern_regex(pattern).match
    matched = [point for point in points if matches(point)]
    if not matched:
        raise ValueError(unknown_point_message(pattern, points, num_layers))
    return matched


@functools.lru_cache(maxsize=256)
def pattern_regex(pattern: str) -> re.Pattern:
    """A name pattern as a regular expression: * stands for any text within one dotted part
    (layers.*.output is every layer's output, not layers.0.attention.output), ** for any text
    at all (layers.3.** is everything in layer 3), ? for one character."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcards = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts) + r"\Z")


def unknown_point_message(name: str, points: tuple[str, ...], num_layers: int) -> str:
    near = difflib.get_close_matches(name, points, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return (
        f"hook {name!r} names no hook point of this {num_layers}-layer model{hint} "
        "(glm_numpy.hooks.hook_points lists them all)"
    )


def recorder(trace: dict[str, np.ndarray], num_layers: int) -> dict[str, list[Hook]]:
    """The trace as hooks: at every point, a function that keeps what it sees in `trace`."""
    return {
        point: [functools.partial(trace.__setitem__, point)] for point in hook_points(num_layers)
    }


def apply_hooks(table: dict[str, list[Hook]], name: str, array: np.ndarray) -> np.ndarray:
    """array [B, ...] -> the same, or a new array where a hook of `name` replaced a row."""
    fns = table.get(name)
    if not fns:
        return array
    rows = list(array)  # [...] each: a hook sees one sequence
    seen = [run_hooks(fns, name, row) for row in rows]
    changed = any(new is not old for new, old in zip(seen, rows))
    return np.stack(seen) if changed else array


def run_hooks(fns: list[Hook], name: str, row: np.ndarray) -> np.ndarray:
    """Pass one row through the hooks of a point in turn; each may replace it (same shape)."""
    for fn in fns:
        replacement = fn(row)
        if replacement is not None:
            replacement = np.asarray(replacement, dtype=row.dtype)
            if replacement.shape != row.shape:
                raise ValueError(
                    f"hook {name!r} returned shape {replacement.shape}; the pass needs {row.shape}"
                )
            row = replacement
    return row
