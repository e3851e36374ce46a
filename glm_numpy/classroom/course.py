"""Writing an nbgrader course from the exercises: one assignment per part of the model.

    write_course(course_dir)   # -> nbgrader_config.py and source/<assignment>/<assignment>.ipynb

Each exercise of an assignment becomes its explanation (glm_numpy.exercises.lessons), a solution
cell — the function with the model solution between ``### BEGIN SOLUTION`` and ``### END
SOLUTION``, which ``nbgrader generate_assignment`` replaces by ``raise NotImplementedError()`` —
and one autograded test cell per part of its points (glm_numpy.classroom.parts): a failing part
raises an AssertionError whose message is the checker's report, so the feedback nbgrader
generates shows the diagnosis at the failing cell.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from glm_numpy.classroom.parts import PARTS
from glm_numpy.exercises.lessons import lesson, notebook_document


@dataclasses.dataclass(frozen=True)
class Assignment:
    name: str  # nbgrader's assignment id, also the notebook's name
    title: str
    exercises: tuple[str, ...]
    teaching: tuple[str, ...]  # the step-through notebooks (notebooks/) that teach it

    @property
    def points(self) -> int:
        return sum(part.points for name in self.exercises for part in PARTS[name])


ASSIGNMENTS: dict[str, Assignment] = {
    a.name: a
    for a in [
        Assignment(
            "embedding-and-norm",
            "Embedding and RMSNorm",
            ("embedding", "rms_norm"),
            ("02-embedding.ipynb", "03-rmsnorm.ipynb"),
        ),
        Assignment("rotary", "Rotary position embedding", ("rotary",), ("04-rotary.ipynb",)),
        Assignment(
            "attention-and-kv-cache",
            "Grouped causal attention and the KV cache",
            ("attention", "kv_cache_step"),
            ("05-attention.ipynb", "08-forward-and-cache.ipynb"),
        ),
        Assignment(
            "mlp-and-block",
            "The SwiGLU MLP and a whole block",
            ("swiglu", "block"),
            ("06-swiglu.ipynb", "07-block.ipynb"),
        ),
        Assignment(
            "sampling",
            "From hidden states to the next token",
            ("lm_head", "top_p"),
            ("08-forward-and-cache.ipynb", "09-sampling.ipynb"),
        ),
    ]
}

SETUP = "import numpy as np\n\nfrom glm_numpy.classroom import check_part"

NBGRADER_CONFIG = """\
# nbgrader configuration of a glm-numpy course (written by `glm-numpy classroom init`).
c = get_config()  # noqa: F821 (nbgrader provides it)

c.CourseDirectory.course_id = {course_id!r}
# Each test cell runs the student's function on a few small cases in a sandbox (5 s per case at
# most); a whole notebook takes seconds.
c.ExecutePreprocessor.timeout = 120
"""


def assignment_named(name: str) -> Assignment:
    try:
        return ASSIGNMENTS[name]
    except KeyError:
        known = ", ".join(ASSIGNMENTS)
        raise KeyError(f"no assignment {name!r}; the assignments are {known}") from None


def _cell(kind: str, source: str, grade_id: str, **nbgrader) -> dict:
    """A cell with nbgrader's metadata: solution, grade (with points) and locked flags."""
    metadata = {
        "grade": False,
        "grade_id": grade_id,
        "locked": True,
        "schema_version": 3,
        "solution": False,
    }
    metadata.update(nbgrader)
    cell = {
        "cell_type": kind,
        "id": grade_id,
        "metadata": {"nbgrader": metadata},
        "source": source.splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def _solution_source(signature: str, body: str) -> str:
    return f"{signature}\n    ### BEGIN SOLUTION\n{body}\n    ### END SOLUTION\n"


def _test_source(name: str, part) -> str:
    points = "point" if part.points == 1 else "points"
    return (
        f"# {name} · {part.id} — {part.points} {points}: {part.description}\n"
        f'result = check_part("{name}", {name}, "{part.id}")\n'
        "assert result.passed, result.message\n"
    )


def assignment_notebook(assignment: Assignment) -> dict:
    """The instructor's version of an assignment (solutions in, nbgrader metadata on)."""
    teaching = ", ".join(f"`notebooks/{n}`" for n in assignment.teaching)
    cells = [
        _cell(
            "markdown",
            f"# {assignment.title}\n\n"
            f"Implement {', '.join(f'`{n}`' for n in assignment.exercises)} with NumPy. "
            f"The step-through notebooks {teaching} explain these layers.\n\n"
            "Below each function, the test cells give its points part by part: run them to "
            "check your work. A failing test names the case that went wrong, what was expected "
            f"and what your function returned, and the likely bug. {assignment.points} points.",
            "about",
        ),
        _cell("code", SETUP, "setup"),
    ]
    for name in assignment.exercises:
        _, text, signature, body = lesson(name)
        cells.append(_cell("markdown", f"## `{name}`\n\n{text}", f"{name}-intro"))
        cells.append(
            _cell(
                "code",
                _solution_source(signature, body),
                f"{name}-function",
                solution=True,
                locked=False,
            )
        )
        for part in PARTS[name]:
            cells.append(
                _cell(
                    "code",
                    _test_source(name, part),
                    f"test-{name}-{part.id}",
                    grade=True,
                    points=part.points,
                )
            )
    return notebook_document(cells)


def write_course(course_dir: str | Path, course_id: str = "glm-numpy") -> list[Path]:
    """Write nbgrader_config.py and source/<assignment>/<assignment>.ipynb for every assignment
    into ``course_dir`` (created if missing). An existing nbgrader_config.py is kept (it is the
    teacher's); the source notebooks are rewritten. -> the files written."""
    course = Path(course_dir)
    if course.exists() and not course.is_dir():
        raise NotADirectoryError(f"{course}: exists and is not a directory")
    course.mkdir(parents=True, exist_ok=True)
    written = []
    config = course / "nbgrader_config.py"
    if not config.exists():
        config.write_text(NBGRADER_CONFIG.format(course_id=course_id), encoding="utf-8")
        written.append(config)
    for assignment in ASSIGNMENTS.values():
        folder = course / "source" / assignment.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{assignment.name}.ipynb"
        content = json.dumps(assignment_notebook(assignment), indent=1, ensure_ascii=False)
        temporary = path.with_suffix(".ipynb.part")
        temporary.write_text(content + "\n", encoding="utf-8")
        temporary.replace(path)  # never a half-written notebook
        written.append(path)
    return written
