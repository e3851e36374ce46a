"""Naming the likely bug behind a wrong answer.

In order of how specific the evidence is:
1. the function did not return (raised, timed out, crashed): read the exception;
2. a known mistake (mistakes.py) gives exactly the student's output on every case where the
   student returned something: that mistake is the diagnosis;
3. the output is one of the inputs, unchanged (structure.returned_input);
4. the shape or dtype of the output already says what is wrong (compare.Mismatch.hint) — with a
   wrong dtype, the values may be wrong too: then 5-6 follow;
5. the first case with wrong values carries a tag with a hint (e.g. only large scores fail);
6. where and how the outputs are wrong (structure.structural_hint: "only the last row is wrong",
   "the values are divided by sqrt(D)", ...), pointing at the step of the definition to re-read;
7. otherwise (nothing to analyse), say that no known mistake matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from glm_numpy.exercises.cases import Case
from glm_numpy.exercises.catalogue import Exercise
from glm_numpy.exercises.compare import Mismatch
from glm_numpy.exercises.runner import Outcome
from glm_numpy.exercises.structure import returned_input, structural_hint

_EXCEPTION_HINTS = [
    (
        r"^NotImplementedError",
        "the function is still the TODO stub: replace the "
        "`raise NotImplementedError` with your code",
    ),
    (
        r"mismatch in its core dimension|not aligned|matmul",
        "the shapes in a matrix product do not "
        "fit — probably a transposed weight: weights are stored [out, in] (torch's layout), so a "
        "linear layer is x @ w.T; print the shapes of your intermediate arrays",
    ),
    (
        r"could not be broadcast|broadcast",
        "two arrays whose shapes do not fit are combined "
        "element-wise: print their shapes (a missing [:, None] or a transposed array?)",
    ),
    (r"^IndexError", "an index is outside an array: check which axis you index and its length"),
    (
        r"takes \d+ positional arguments? but \d+ (were|was) given|missing \d+ required",
        "the function does not have the signature asked for: {signature}",
    ),
    (
        r"^NameError",
        "a name is not defined: in a notebook, run the cell that defines it (and "
        "import numpy as np)",
    ),
    (r"^SystemExit", "the function called exit(): return the result instead"),
]


def exception_hint(error: str, signature: str) -> str:
    for pattern, hint in _EXCEPTION_HINTS:
        if re.search(pattern, error):
            return hint.format(signature=signature)
    return "read the error above: it names the line of your function that failed"


def outcome_hint(outcome: Outcome, signature: str, time_limit: float) -> str:
    """The likely bug when the function did not return a usable value."""
    if outcome.kind == "error":
        return exception_hint(outcome.error, signature)
    if outcome.kind == "timeout":
        return (
            f"the function did not finish within {time_limit:g} s and was stopped: a loop "
            "that never ends (a while loop whose condition never changes?), or a pure-Python "
            "loop over every number that should be one array operation"
        )
    if outcome.kind == "crashed":
        return "the function ended the Python process running it (exit, os._exit, or a crash)"
    return "return numpy arrays (or a set of ids for top_p), not other objects"


def matching_mistake(
    exercise: Exercise, case_list: Sequence[Case], outcomes: Sequence[Outcome]
) -> str | None:
    """The diagnosis of the first known mistake whose output equals the student's on every case
    where the student returned a value."""
    answered = [(case, o.value) for case, o in zip(case_list, outcomes) if o.kind == "value"]
    for mistake in exercise.mistakes():
        if all(_agrees(exercise, mistake.function, case, got) for case, got in answered):
            return mistake.diagnosis
    return None


def _agrees(exercise: Exercise, function, case: Case, got) -> bool:
    try:
        with np.errstate(all="ignore"):
            wrong = function(*case.args)
    except Exception:  # a mistake that cannot run on this case cannot explain the output
        return False
    return exercise.output.close(wrong, got)


def likely_bug(
    exercise: Exercise,
    case_list: Sequence[Case],
    outcomes: Sequence[Outcome],
    failed: int,
    mismatch: Mismatch | None,
    time_limit: float,
) -> str:
    """The likely bug, in plain words, given every outcome and the index of the first failure
    (mismatch is None when that case did not return a value)."""
    if mismatch is None:
        return outcome_hint(outcomes[failed], exercise.signature, time_limit)
    diagnosis = matching_mistake(exercise, case_list, outcomes)
    if diagnosis:
        return diagnosis
    with np.errstate(all="ignore"):
        expected = [exercise.reference(*case.args) for case in case_list]
    unchanged = {  # an input returned as it is, in every case with wrong values
        returned_input(exercise, case_list[i], o.value)
        for i, (o, right) in enumerate(zip(outcomes, expected))
        if o.kind == "value" and not exercise.output.close(right, o.value)
    }
    if len(unchanged) == 1 and None not in unchanged:
        return unchanged.pop()
    structure = structural_hint(exercise, case_list, outcomes, expected)
    value_failed = _first_wrong_values(exercise, outcomes, expected)
    tag_hints = [
        exercise.tag_hints[tag]
        for tag in sorted(case_list[value_failed].tags if value_failed is not None else ())
        if tag in exercise.tag_hints
    ][:1]
    found = "; ".join(tag_hints + ([structure] if structure else []))
    if mismatch.hint:  # a wrong shape or dtype; a wrong dtype may hide wrong values
        if structure and value_failed is not None:
            return f"{mismatch.hint}. Besides, the values are wrong: {found}"
        return mismatch.hint
    if found:
        return found
    return (
        "no known mistake matches your output; recompute the failing case by hand, step by "
        f"step, against the definition: {exercise.signature}"
    )


def _first_wrong_values(exercise: Exercise, outcomes: Sequence[Outcome], expected) -> int | None:
    """The first answered case whose values are wrong (a wrong dtype alone does not count)."""
    for i, (outcome, right) in enumerate(zip(outcomes, expected)):
        if outcome.kind == "value" and not exercise.output.close(right, outcome.value):
            return i
    return None
