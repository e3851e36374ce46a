"""Classroom exercises: students implement each layer of ChatGLM2; a checker runs their
function against the package's own layers on many cases and names the likely bug.

    from glm_numpy.exercises import check
    check("rotary", my_rotary)          # -> CheckResult(.passed, .message)

Exercises (the student's function names; signatures in ``EXERCISES[name].signature``):
embedding, rms_norm, rotary, attention, swiglu, lm_head, block, kv_cache_step, top_p.
``grade_file(path)`` (the ``glm-numpy check FILE.py`` command) grades a file defining them.
``run_with({"rotary": my_rotary}, prompt)`` runs the whole default model with them inside.

Modules: cases (inputs), references (the right answers, from glm_numpy), mistakes (known wrong
answers with their diagnoses), compare, diagnose, structure (where and how an unknown mistake is
wrong; with evidence and probes), runner (sandboxed calls with a time limit), check, grade.
"""

from glm_numpy.exercises.catalogue import EXERCISES
from glm_numpy.exercises.check import CheckResult, check
from glm_numpy.exercises.grade import GradeReport, grade_file
from glm_numpy.exercises.whole_model import run_with

EXERCISE_NAMES = tuple(EXERCISES)

__all__ = [
    "EXERCISES",
    "EXERCISE_NAMES",
    "CheckResult",
    "GradeReport",
    "check",
    "grade_file",
    "run_with",
]
