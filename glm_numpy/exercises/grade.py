"""Grading a student's Python file: one function per exercise, named after it.

    embedding  rms_norm  rotary  attention  swiglu  lm_head  block  kv_cache_step  top_p

(signatures in glm_numpy.exercises.EXERCISES[name].signature). The file is run afresh inside
each exercise's sandbox, so a file that fails or hangs on import is reported, not fatal.
"""

from __future__ import annotations

import dataclasses
import runpy
from collections.abc import Sequence
from pathlib import Path

from glm_numpy.exercises.catalogue import EXERCISES
from glm_numpy.exercises.check import DEFAULT_TIME_LIMIT, CheckResult, check_loaded, exercise_named


@dataclasses.dataclass(frozen=True)
class GradeReport:
    path: Path
    results: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def format(self) -> str:
        """Every exercise's report, then a one-line total."""
        passed = sum(r.passed for r in self.results)
        parts = [r.message for r in self.results]
        parts.append(f"{self.path}: {passed} of {len(self.results)} exercises passed")
        return "\n\n".join(parts)


def _function_from_file(path: Path, name: str):
    """Run the file as a script and take the function ``name`` it defines."""
    namespace = runpy.run_path(str(path), run_name="student_submission")
    function = namespace.get(name)
    if not callable(function):
        raise LookupError(f"{path.name} defines no function named {name!r}")
    return function


def grade_file(
    path: str | Path, names: Sequence[str] | None = None, time_limit: float = DEFAULT_TIME_LIMIT
) -> GradeReport:
    """Check each exercise in ``names`` (default: all) against the function of the same name in
    the Python file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to grade")
    exercises = [exercise_named(n) for n in (names or EXERCISES)]
    results = [
        check_loaded(e, lambda n=e.name: _function_from_file(path, n), time_limit)
        for e in exercises
    ]
    return GradeReport(path, results)
