"""The evidence the diagnosis works on: one failing case of one output array, compared with the
right answer a little more loosely than the checker, and what each of its axes means.

Shape legend: T tokens · S cached + new · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from glm_numpy.exercises.cases import Case

# ------------------------------------------------------------------ what each output axis means


@dataclasses.dataclass(frozen=True)
class Layout:
    """The meaning of each axis of one output array of one case.

    axes: per axis "token", "head", "channel", "row" (cache rows) or "vocab".
    heads_per_group: H/G for a head axis (0 when the exercise has no groups).
    rotary_dims: R for a channel axis whose first R channels rotate (0 otherwise).
    new_row: index of the row a cache step appends (-1 when there is none).
    sizes: the named sizes of the case, to name a constant factor (D, Dh, ...).
    """

    axes: tuple[str, ...]
    sizes: dict[str, int]
    heads_per_group: int = 0
    rotary_dims: int = 0
    new_row: int = -1


def layout_of(name: str, part: str, args: tuple) -> Layout:
    """The layout of output ``part`` ("" for a single array) of exercise ``name`` on a case."""
    if name == "embedding":
        ids, table = args
        return Layout(("token", "channel"), {"D": table.shape[1], "V": table.shape[0]})
    if name in ("rms_norm", "swiglu"):
        return Layout(("token", "channel"), {"D": args[0].shape[1]})
    if name == "lm_head":
        return Layout(("token", "vocab"), {"D": args[0].shape[1], "V": args[1].shape[0]})
    if name == "rotary":
        Dh = args[0].shape[2]
        return Layout(("token", "head", "channel"), {"Dh": Dh, "R": Dh // 2}, rotary_dims=Dh // 2)
    if name == "attention":
        q, k, _ = args
        H, G, Dh = q.shape[1], k.shape[1], q.shape[2]
        sizes = {"Dh": Dh, "H": H, "S": k.shape[0], "H·Dh": H * Dh}
        return Layout(("token", "head", "channel"), sizes, heads_per_group=H // G)
    if name == "block":
        x, _, weights, H = args[:4]
        Dh = weights["self_attention.dense.weight"].shape[1] // H
        return Layout(("token", "channel"), {"D": x.shape[1], "Dh": Dh})
    if name == "kv_cache_step":
        q, _, _, cache_k, _ = args
        S, G, Dh = cache_k.shape
        sizes = {"Dh": Dh, "H": q.shape[1], "S+1": S + 1, "H·Dh": q.shape[1] * Dh}
        if part == "out":
            return Layout(("token", "head", "channel"), sizes, heads_per_group=q.shape[1] // G)
        return Layout(("row", "group", "channel"), sizes, new_row=S)
    raise KeyError(name)


# ------------------------------------------------------------------ comparing values loosely


def near(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Element-wise: a matches b, a little looser than the checker (a student's float32 path to
    the same wrong answer rounds differently from ours)."""
    scale = float(np.sqrt(np.mean(np.square(b)))) if b.size else 0.0
    with np.errstate(all="ignore"):
        return np.abs(a - b) <= 10 * atol + 10 * rtol * np.abs(b) + 1e-4 * scale


@dataclasses.dataclass(frozen=True)
class Pair:
    """One failing case of one output array: expected and got as float64, and its layout."""

    case: Case
    expected: np.ndarray
    got: np.ndarray
    layout: Layout
    atol: float
    rtol: float

    def near(self, a, b) -> np.ndarray:
        return near(a, b, self.atol, self.rtol)

    @property
    def wrong(self) -> np.ndarray:
        return ~self.near(self.got, self.expected)


def fit_factor(got: np.ndarray, expected: np.ndarray) -> float | None:
    denominator = float(np.sum(expected * expected))
    if denominator == 0:
        return None
    return float(np.sum(got * expected)) / denominator


def named_factor(factors: list[float], layouts: list[Layout]) -> str | None:
    """A name for per-case factors that are one expression of the case's sizes: 'sqrt(D)'."""
    candidates: dict[str, list[float]] = {}
    for layout in layouts:
        for name, n in layout.sizes.items():
            for label, value in (
                (f"{name}", n),
                (f"1/{name}", 1 / n),
                (f"sqrt({name})", np.sqrt(n)),
                (f"1/sqrt({name})", 1 / np.sqrt(n)),
            ):
                candidates.setdefault(label, []).append(value)
    for label, values in candidates.items():
        if len(values) == len(factors) and np.allclose(factors, values, rtol=2e-3):
            return label
    return None


def all_near(pairs: list[Pair], make: Callable[[Pair], np.ndarray | None]) -> bool:
    for pair in pairs:
        try:
            candidate = make(pair)
        except Exception:  # a variant that cannot run on this case explains nothing
            return False
        if candidate is None:
            return False
        candidate = np.asarray(candidate, dtype=np.float64)
        if candidate.shape != pair.got.shape or not pair.near(candidate, pair.got).all():
            return False
    return True
