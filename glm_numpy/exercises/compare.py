"""Comparing a student's output with the expected one, and saying in words how it differs.

Each exercise returns one of three kinds of output: an array, a tuple of named arrays, or a set
of token ids. Each kind can
  ``compare(expected, got)`` -> None if right, else a Mismatch (strict: type, shape, dtype, values);
  ``close(a, b)``            -> whether two outputs agree in value (used to match a student's
                                output against known mistakes: any float dtype, NaN equal to NaN).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """How an output is wrong: a one-line summary, the evidence, and — when the way it is wrong
    already names the bug (a transposed shape, a float64 result) — a hint."""

    summary: str
    details: str = ""
    max_error: float | None = None
    hint: str = ""


def describe(value: Any) -> str:
    """A short description of a value: '[4, 2, 16] float32' for arrays, the type otherwise."""
    if isinstance(value, np.ndarray):
        return f"[{', '.join(map(str, value.shape))}] {value.dtype}"
    if isinstance(value, (tuple, list)) and len(value) <= 4:
        return f"{type(value).__name__} of ({', '.join(describe(v) for v in value)})"
    return type(value).__name__


def _shape_hint(expected: tuple, got: tuple) -> str:
    if len(got) == len(expected) == 2 and got == expected[::-1]:
        return "the output is transposed: check which axis is which (rows are tokens)"
    if tuple(n for n in got if n != 1) == tuple(n for n in expected if n != 1):
        return "an axis of size 1 is missing or extra: check your reshape / keepdims / indexing"
    if int(np.prod(got)) == int(np.prod(expected)):
        return "the right number of numbers in the wrong layout: check your reshape and transpose"
    if len(got) == len(expected) and got[0] != expected[0] and got[1:] == expected[1:]:
        return f"{got[0]} rows instead of {expected[0]}: return one row per token"
    return (
        "the shape is wrong: print the shape after each step and compare it with the shapes in "
        "the signature (an axis repeated, summed or indexed on the wrong side?)"
    )


@dataclasses.dataclass(frozen=True)
class ArrayOutput:
    """A single float32 array, right where |got - expected| <= atol + rtol * |expected|."""

    atol: float = 1e-4
    rtol: float = 1e-3
    name: str = "the output"

    def compare(self, expected: np.ndarray, got: Any) -> Mismatch | None:
        if not isinstance(got, np.ndarray):
            return Mismatch(
                f"{self.name} is a {type(got).__name__}, expected a numpy array "
                f"{describe(expected)}",
                hint="return a numpy array (np.asarray converts lists and scalars)",
            )
        if got.shape != expected.shape:
            return Mismatch(
                f"{self.name} has shape {list(got.shape)}, expected {list(expected.shape)}",
                hint=_shape_hint(expected.shape, got.shape),
            )
        if got.dtype.kind not in "fiub":
            return Mismatch(f"{self.name} has dtype {got.dtype}, expected {expected.dtype}")
        values = self._compare_values(expected, got)
        if got.dtype != expected.dtype:
            verdict = "the values are right" if values is None else "the values are wrong too"
            return Mismatch(
                f"{self.name} has dtype {got.dtype}, expected {expected.dtype} ({verdict})",
                details=values.details if values else "",
                max_error=values.max_error if values else None,
                hint=f"cast the result with .astype(np.{expected.dtype}): the model keeps "
                "activations in float32 (float64 somewhere in your code widens everything after)",
            )
        return values

    def _compare_values(self, expected: np.ndarray, got: np.ndarray) -> Mismatch | None:
        got64, expected64 = got.astype(np.float64), expected.astype(np.float64)
        bad_finite = ~np.isfinite(got64) & np.isfinite(expected64)
        if bad_finite.any():
            where = tuple(int(i) for i in np.argwhere(bad_finite)[0])
            return Mismatch(
                f"{self.name} contains {int(bad_finite.sum())} NaN/inf values where finite "
                "numbers were expected",
                details=f"first at index {where}: expected {expected64[where]:.6g}, "
                f"got {got64[where]}",
                max_error=float("inf"),
                hint="NaN and inf come from a division by zero, the square root of a negative "
                "number, or exp() of a large number: find the step that produces the first one",
            )
        with np.errstate(invalid="ignore"):
            error = np.abs(got64 - expected64)
        error = np.where(np.isnan(expected64) & np.isnan(got64), 0.0, error)
        wrong = ~(error <= self.atol + self.rtol * np.abs(expected64))
        if not wrong.any():
            return None
        where = tuple(
            int(i) for i in np.unravel_index(np.argmax(np.where(wrong, error, -1)), error.shape)
        )
        max_error = float(error[where])
        return Mismatch(
            f"{self.name}: {int(wrong.sum())} of {wrong.size} values are wrong, "
            f"max |error| {max_error:.3g}",
            details=f"at index {where}: expected {expected64[where]:.6g}, got {got64[where]:.6g}",
            max_error=max_error,
        )

    def close(self, a: Any, b: Any) -> bool:
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape:
            return False
        if a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub":
            return False
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore"):
            return bool(np.allclose(a64, b64, atol=self.atol, rtol=self.rtol, equal_nan=True))


@dataclasses.dataclass(frozen=True)
class ArraysOutput:
    """A tuple of arrays, each named (e.g. ``out``, ``cache_k``, ``cache_v``)."""

    names: tuple[str, ...]
    atol: float = 1e-4
    rtol: float = 1e-3

    def _parts(self) -> list[ArrayOutput]:
        return [ArrayOutput(self.atol, self.rtol, name=f"the returned {n}") for n in self.names]

    def compare(self, expected: tuple, got: Any) -> Mismatch | None:
        if not isinstance(got, (tuple, list)) or len(got) != len(self.names):
            return Mismatch(
                f"returned {describe(got)}, expected a tuple ({', '.join(self.names)})",
                hint=f"return all {len(self.names)} results: return {', '.join(self.names)}",
            )
        for part, e, g in zip(self._parts(), expected, got):
            mismatch = part.compare(e, g)
            if mismatch:
                return mismatch
        return None

    def close(self, a: Any, b: Any) -> bool:
        if not all(isinstance(v, (tuple, list)) and len(v) == len(self.names) for v in (a, b)):
            return False
        return all(part.close(x, y) for part, x, y in zip(self._parts(), a, b))


def _as_id_set(value: Any) -> set[int] | None:
    """Any iterable of whole numbers (set, list, array of ids) -> set[int]; None otherwise."""
    if isinstance(value, np.ndarray):
        if value.dtype == bool or value.dtype.kind not in "iu":
            return None
        value = value.ravel().tolist()
    if not isinstance(value, Iterable) or isinstance(value, (str, bytes, dict)):
        return None
    ids = set()
    for item in value:
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            return None
        ids.add(int(item))
    return ids


@dataclasses.dataclass(frozen=True)
class IdSetOutput:
    """A set of token ids; any iterable of integers (set, list, int array) is accepted."""

    def compare(self, expected: set[int], got: Any) -> Mismatch | None:
        ids = _as_id_set(got)
        if ids is None:
            return Mismatch(
                f"returned {describe(got)}, expected a set of token ids (integers)",
                hint="return the kept ids, e.g. set(order[:n].tolist()), not a mask or the "
                "probabilities",
            )
        if ids == expected:
            return None
        missing, extra = sorted(expected - ids), sorted(ids - expected)
        return Mismatch(
            f"kept {len(ids)} ids, expected {len(expected)}",
            details=f"expected {sorted(expected)}; missing {missing}, should not be kept {extra}",
        )

    def close(self, a: Any, b: Any) -> bool:
        a_ids, b_ids = _as_id_set(a), _as_id_set(b)
        return a_ids is not None and a_ids == b_ids
