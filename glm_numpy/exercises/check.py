"""check(name, student_fn): run a student's function on every case of an exercise and report.

    >>> result = check("rms_norm", my_rms_norm)
    >>> result.passed, print(result.message)

The result never depends on the student's code behaving: exceptions, wrong types, shapes or
dtypes, NaN, and functions that run too long all come back as a failed CheckResult.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from glm_numpy.exercises.catalogue import EXERCISES, Exercise
from glm_numpy.exercises.compare import Mismatch, describe
from glm_numpy.exercises.diagnose import likely_bug
from glm_numpy.exercises.runner import run_cases

DEFAULT_TIME_LIMIT = 5.0  # seconds per case; the reference needs milliseconds


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """passed: every case right. message: on failure the first failing case, expected vs got,
    the maximum error and the likely bug."""

    name: str
    passed: bool
    message: str
    cases_passed: int
    cases_total: int
    failed_case: str | None = None
    max_error: float | None = None
    likely_bug: str | None = None

    def __str__(self) -> str:
        return self.message

    __repr__ = __str__  # a notebook cell ending in check(...) shows the report itself


def exercise_named(name: str) -> Exercise:
    try:
        return EXERCISES[name]
    except KeyError:
        raise KeyError(f"no exercise {name!r}; the exercises are {', '.join(EXERCISES)}") from None


def check(name: str, student_fn: Callable, time_limit: float = DEFAULT_TIME_LIMIT) -> CheckResult:
    """Check ``student_fn`` against exercise ``name`` (one of EXERCISES; signatures in
    ``EXERCISES[name].signature``). Each case may take at most ``time_limit`` seconds."""
    exercise = exercise_named(name)
    if not callable(student_fn):
        total = len(exercise.make_cases())
        return CheckResult(
            name,
            False,
            f"{name}: FAILED — expected a function, got "
            f"{describe(student_fn)} (pass the function itself, without calling "
            "it)",
            0,
            total,
        )
    return check_loaded(exercise, lambda: student_fn, time_limit)


def check_loaded(
    exercise: Exercise,
    load_function: Callable[[], Callable],
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> CheckResult:
    """Like check, with the function obtained by ``load_function()`` inside the sandbox (so that
    importing a student's file is as protected as calling the function)."""
    case_list = exercise.make_cases()
    loaded, outcomes = run_cases(load_function, [c.args for c in case_list], time_limit)
    name, total = exercise.name, len(case_list)
    if loaded.kind != "value":
        why = loaded.error or loaded.kind
        message = f"{name}: FAILED — could not get the function: {why}"
        return CheckResult(name, False, message, 0, total, likely_bug=why)
    with np.errstate(all="ignore"):
        expected = [exercise.reference(*c.args) for c in case_list]
    for i, (case, outcome) in enumerate(zip(case_list, outcomes)):
        mismatch = _mismatch(exercise, expected[i], outcome)
        if mismatch is None and outcome.kind == "value":
            continue
        bug = likely_bug(exercise, case_list, outcomes, i, mismatch, time_limit)
        message = _failure_message(exercise, i, case, expected[i], outcome, mismatch, bug)
        return CheckResult(
            name,
            False,
            message,
            i,
            total,
            case.label,
            mismatch.max_error if mismatch else None,
            bug,
        )
    return CheckResult(name, True, f"{name}: PASSED all {total} cases", total, total)


def _mismatch(exercise: Exercise, expected, outcome) -> Mismatch | None:
    """None when the case is right or did not return a value."""
    if outcome.kind != "value":
        return None
    return exercise.output.compare(expected, outcome.value)


def _failure_message(exercise, index, case, expected, outcome, mismatch, bug) -> str:
    lines = [
        f"{exercise.name}: FAILED on case {index + 1}: {case.label}",
        f"  inputs:     {case.describe_inputs()}",
        f"  expected:   {_short(expected)}",
    ]
    if mismatch is None:
        lines.append(f"  got:        {outcome.kind}: {outcome.error}")
        details = outcome.details.strip().splitlines()
        lines += [f"              {line}" for line in details[-6:-1]]
    else:
        lines.append(f"  got:        {_short(outcome.value)}")
        lines.append(f"  problem:    {mismatch.summary}")
        if mismatch.details:
            lines.append(f"              {mismatch.details}")
        if mismatch.max_error is not None:
            lines.append(f"  max error:  {mismatch.max_error:.3g}")
    lines.append(f"  likely bug: {bug}")
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, set):
        return f"ids {sorted(value)}"
    return describe(value)
