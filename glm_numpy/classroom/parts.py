"""Partial credit: each exercise's points split into parts a grader can award one by one.

    >>> result = check_part("rotary", rotary, "pairing")
    >>> result.passed, print(result.message)

A part is either a group of the checker's cases (``case_group``: their outputs have the right
values, grouped by the cases' tags) or a property every right answer has (the output's shape and
float32 dtype; for rotary, channels R..Dh-1 passed through and each interleaved pair turned, not
mixed). A wrong dtype costs only the shape part. The case groups cover every case, so an answer
earns every point exactly when ``glm_numpy.exercises.check`` passes it. A part that is not
earned says why, followed by the whole check's report (the first failing case, expected vs got,
the likely bug).

The student's function runs in the checker's sandbox (glm_numpy.exercises.runner), once per
exercise: the outcomes and the check are remembered for as long as the same function is graded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from glm_numpy.exercises import EXERCISES, CheckResult, check
from glm_numpy.exercises.cases import Case
from glm_numpy.exercises.check import DEFAULT_TIME_LIMIT, exercise_named
from glm_numpy.exercises.compare import describe
from glm_numpy.exercises.runner import Outcome, run_cases

# (cases, expected outputs, the student's outcomes) -> None when the part is earned, else why not
Rule = Callable[[list[Case], list, list[Outcome]], "str | None"]


@dataclasses.dataclass(frozen=True)
class Part:
    id: str
    points: int
    description: str  # what earns the points, shown in the assignment's test cell
    rule: Rule
    selects: Callable[[Case], bool] | None = None  # a group of cases: which ones


@dataclasses.dataclass(frozen=True)
class PartResult:
    name: str
    part: str
    points: int  # earned: the part's points or 0
    max_points: int
    passed: bool
    message: str
    check: CheckResult  # the whole exercise's check, with its diagnosis

    def __str__(self) -> str:
        return self.message

    __repr__ = __str__


# ----------------------------------------------------------------------------- rules
def _not_returned(index: int, case: Case, outcome: Outcome) -> str:
    return (
        f"case {index + 1} ({case.label}) did not return a value: {outcome.error or outcome.kind}"
    )


def _outcomes(cases, outcomes):
    """(index, case, outcome) for every case, the missing outcomes (after a timeout) as such."""
    for i, case in enumerate(cases):
        yield i, case, outcomes[i] if i < len(outcomes) else Outcome("timeout", error="not run")


def _shape_problem(expected, got) -> str | None:
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"returned {describe(got)}, expected {describe(expected)}"
        problems = [_shape_problem(e, g) for e, g in zip(expected, got)]
        return next((p for p in problems if p), None)
    if (
        not isinstance(got, np.ndarray)
        or got.shape != expected.shape
        or got.dtype != expected.dtype
    ):
        return f"returned {describe(got)}, expected {describe(expected)}"
    return None


def shapes(cases, expected, outcomes) -> str | None:
    """Every case returns arrays of the reference's shapes and dtypes (values not compared)."""
    for i, case, outcome in _outcomes(cases, outcomes):
        if outcome.kind != "value":
            return _not_returned(i, case, outcome)
        problem = _shape_problem(expected[i], outcome.value)
        if problem:
            return f"case {i + 1} ({case.label}): {problem}"
    return None


def _right_on(selects: Callable[[Case], bool], exercise_name: str) -> Rule:
    output = EXERCISES[exercise_name].output

    def rule(cases, expected, outcomes) -> str | None:
        for i, case, outcome in _outcomes(cases, outcomes):
            if not selects(case):
                continue
            if outcome.kind != "value":
                return _not_returned(i, case, outcome)
            with np.errstate(all="ignore"):  # right values in any dtype: the shape part
                if output.close(expected[i], outcome.value):  # takes the dtype's point
                    continue
                mismatch = output.compare(expected[i], outcome.value)
            return f"case {i + 1} ({case.label}) is wrong: {mismatch.summary}"
        return None

    return rule


def case_group(exercise: str, part_id: str, points: int, description: str, tag=None) -> Part:
    """A part earned when the exercise's cases tagged ``tag`` (see glm_numpy.exercises.cases),
    or with tag None its untagged (ordinary) cases, are right."""

    def selects(case: Case) -> bool:
        return tag in case.tags if tag else not case.tags

    return Part(part_id, points, description, _right_on(selects, exercise), selects)


def _rotary_channels(rule_for_case) -> Rule:
    """A rotary rule checked on each case: rule_for_case(x [T, N, Dh], out [T, N, Dh], R)."""

    def rule(cases, expected, outcomes) -> str | None:
        for i, case, outcome in _outcomes(cases, outcomes):
            if outcome.kind != "value":
                return _not_returned(i, case, outcome)
            x, out = case.args[0], outcome.value
            if not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype.kind != "f":
                problem = f"returned {describe(out)}, expected the shape of x"
                return f"case {i + 1} ({case.label}): {problem}"
            with np.errstate(all="ignore"):  # any float dtype: the shape part checks float32
                problem = rule_for_case(
                    x.astype(np.float64), out.astype(np.float64), x.shape[-1] // 2
                )
            if problem:
                return f"case {i + 1} ({case.label}): {problem}"
        return None

    return rule


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, atol=2e-3, rtol=2e-3))  # the rotary checker's tolerance


def _passes_through(x, out, R) -> str | None:
    if _close(out[..., R:], x[..., R:]):
        return None
    return "channels R..Dh-1 changed; they must equal x's (only the first R = Dh/2 rotate)"


def _pair_lengths(x, out, R) -> str | None:
    def lengths(a):  # [T, N, R/2]: the length of each interleaved pair (2i, 2i+1)
        return np.hypot(a[..., 0:R:2], a[..., 1:R:2])

    if _close(lengths(out), lengths(x)):
        return None
    return (
        "an interleaved pair (2i, 2i+1) of the first R channels changed its length, so it was "
        "not turned as a pair: its two channels were mixed with others"
    )


passes_through = _rotary_channels(_passes_through)
turns_pairs = _rotary_channels(_pair_lengths)


# ----------------------------------------------------------------------------- the parts
def _shape_part() -> Part:
    return Part(
        "shape", 1, "the output has the right shape and dtype (float32) on every case", shapes
    )


PARTS: dict[str, list[Part]] = {
    "embedding": [
        _shape_part(),
        case_group("embedding", "rows", 1, "every case: row ids[t] of the table"),
    ],
    "rms_norm": [
        _shape_part(),
        case_group("rms_norm", "rows", 1, "ordinary rows are normalised right"),
        case_group(
            "rms_norm", "eps", 1, "where eps matters (large eps, tiny rows, a row of zeros)", "eps"
        ),
    ],
    "rotary": [
        _shape_part(),
        Part("pass-through", 1, "channels R..Dh-1 pass through unchanged", passes_through),
        Part(
            "pairing",
            1,
            "each interleaved pair (2i, 2i+1) of the first R channels is turned as a pair",
            turns_pairs,
        ),
        case_group("rotary", "angles", 1, "the right angles at positions up to 2048"),
        case_group(
            "rotary", "long-positions", 1, "the right angles at positions beyond 2048", "long"
        ),
    ],
    "attention": [
        _shape_part(),
        case_group(
            "attention",
            "decode",
            1,
            "one new query after cached keys (it sees every key)",
            "decode",
        ),
        case_group(
            "attention", "causal-groups", 2, "causal mask, grouped heads, queries after a cache"
        ),
        case_group(
            "attention", "large-scores", 1, "large scores do not overflow the softmax", "large"
        ),
    ],
    "kv_cache_step": [
        Part("shape", 1, "out and both caches have the right shapes and dtypes", shapes),
        case_group("kv_cache_step", "steps", 2, "decode steps at positions up to 2048"),
        case_group(
            "kv_cache_step", "long-positions", 1, "a decode step at a position beyond 2048", "long"
        ),
    ],
    "swiglu": [
        _shape_part(),
        case_group("swiglu", "values", 2, "every case: silu(gate) * up, projected down"),
    ],
    "block": [
        _shape_part(),
        case_group(
            "block",
            "mlp-half",
            1,
            "the MLP half and both residuals (attention output weights at zero)",
            "mlp_only",
        ),
        case_group(
            "block",
            "attention-half",
            1,
            "the attention half (MLP output weights at zero)",
            "attention_only",
        ),
        case_group("block", "whole-block", 1, "the whole block"),
        case_group(
            "block", "long-positions", 1, "the whole block at positions beyond 2048", "long"
        ),
    ],
    "lm_head": [
        _shape_part(),
        case_group("lm_head", "values", 1, "every case: one logit per vocabulary entry"),
    ],
    "top_p": [
        case_group("top_p", "kept-ids", 2, "the kept ids on ordinary logits"),
        case_group("top_p", "large-logits", 1, "large logits do not overflow the softmax", "large"),
    ],
}


def part_named(name: str, part_id: str) -> Part:
    exercise_named(name)  # a clear error for an unknown exercise
    for part in PARTS[name]:
        if part.id == part_id:
            return part
    known = ", ".join(p.id for p in PARTS[name])
    raise KeyError(f"exercise {name!r} has no part {part_id!r}; its parts are {known}")


# ----------------------------------------------------------------------------- grading
@dataclasses.dataclass
class _Graded:
    """One run of a student's function on an exercise: its outcomes and its check."""

    function: Callable
    time_limit: float
    cases: list[Case]
    expected: list
    outcomes: list[Outcome]
    check: CheckResult


_last_graded: dict[str, _Graded] = {}


def _graded(name: str, student_fn: Callable, time_limit: float) -> _Graded:
    remembered = _last_graded.get(name)
    if remembered and remembered.function is student_fn and remembered.time_limit == time_limit:
        return remembered
    exercise = exercise_named(name)
    cases = exercise.make_cases()
    with np.errstate(all="ignore"):
        expected = [exercise.reference(*c.args) for c in cases]
    if callable(student_fn):
        _, outcomes = run_cases(lambda: student_fn, [c.args for c in cases], time_limit)
    else:
        outcomes = [Outcome("error", error=f"expected a function, got {describe(student_fn)}")]
    graded = _Graded(
        student_fn, time_limit, cases, expected, outcomes, check(name, student_fn, time_limit)
    )
    _last_graded[name] = graded
    return graded


def check_part(
    name: str, student_fn: Callable, part_id: str, time_limit: float = DEFAULT_TIME_LIMIT
) -> PartResult:
    """Whether ``student_fn`` earns the part ``part_id`` of exercise ``name`` (PARTS[name])."""
    part = part_named(name, part_id)
    graded = _graded(name, student_fn, time_limit)
    why_not = part.rule(graded.cases, graded.expected, graded.outcomes)
    points = "point" if part.points == 1 else "points"
    if why_not is None:
        message = f"{name} · {part.id}: earned {part.points} {points}"
        return PartResult(name, part.id, part.points, part.points, True, message, graded.check)
    message = (
        f"{name} · {part.id} ({part.description}): 0 of {part.points} {points}\n"
        f"  why:        {why_not}\n\n{graded.check.message}"
    )
    return PartResult(name, part.id, 0, part.points, False, message, graded.check)
