"""The class report: per student and exercise the points, whether it passed and the diagnosis,
and which mistakes are most common across the class.

    report = class_report(course_dir, ["rotary"])     # after `nbgrader autograde rotary`
    print(report.markdown()); report.write(folder)    # .md, .json and a bar chart .png

Points come from nbgrader's gradebook (so a grade the teacher changed by hand counts); the
diagnosis comes from ``glm_numpy.exercises`` run on the student's own code, taken from the
autograded notebook (every code cell but the test cells). A mistake is named by its catalogue
entry (glm_numpy.exercises.mistakes): the first clause of its diagnosis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from glm_numpy.classroom.course import assignment_named
from glm_numpy.classroom.parts import PARTS
from glm_numpy.exercises import CheckResult, grade_file
from glm_numpy.exercises.check import exercise_named


# ----------------------------------------------------------------------------- mistakes
def mistake_name(exercise: str, likely_bug: str | None) -> tuple[str | None, bool]:
    """-> (a short name for the likely bug, whether it is a catalogued mistake of the exercise).
    The name is the diagnosis up to its first ':' or ';' (the rest explains the fix)."""
    if not likely_bug:
        return None, False
    catalogued = any(m.diagnosis == likely_bug for m in exercise_named(exercise).mistakes())
    return re.split(r"[:;]\s", likely_bug, maxsplit=1)[0].strip(), catalogued


def result_record(result: CheckResult) -> dict:
    """A CheckResult as JSON-ready data (what ``glm-numpy check --json`` prints per exercise)."""
    name, catalogued = mistake_name(result.name, result.likely_bug)
    error = result.max_error
    return {
        "exercise": result.name,
        "passed": result.passed,
        "cases_passed": result.cases_passed,
        "cases_total": result.cases_total,
        "failed_case": result.failed_case,
        "max_error": error if error is None or math.isfinite(error) else None,
        "likely_bug": result.likely_bug,
        "mistake": name,
        "catalogued": catalogued,
        "message": result.message,
    }


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True)
class ExerciseRow:
    student: str
    assignment: str
    exercise: str
    points: float
    max_points: float
    check: dict  # result_record of the student's function

    @property
    def passed(self) -> bool:
        return self.check["passed"]


@dataclasses.dataclass(frozen=True)
class ClassReport:
    assignments: tuple[str, ...]
    rows: list[ExerciseRow]

    def students(self) -> list[str]:
        return sorted({row.student for row in self.rows})

    def totals(self) -> dict[str, tuple[float, float]]:
        """student -> (points, max points) over the report's assignments."""
        totals: dict[str, tuple[float, float]] = {}
        for row in self.rows:
            points, most = totals.get(row.student, (0.0, 0.0))
            totals[row.student] = (points + row.points, most + row.max_points)
        return totals

    def common_mistakes(self) -> list[tuple[str, str, bool, list[str]]]:
        """(exercise, mistake, catalogued, students) for every diagnosed failure, most common
        first."""
        who: dict[tuple[str, str, bool], list[str]] = {}
        for row in self.rows:
            if not row.passed and row.check["mistake"]:
                key = (row.exercise, row.check["mistake"], row.check["catalogued"])
                who.setdefault(key, []).append(row.student)
        counts = Counter({key: len(students) for key, students in who.items()})
        return [(*key, who[key]) for key, _ in counts.most_common()]

    def markdown(self) -> str:
        lines = [f"# Class report: {', '.join(self.assignments)}", ""]
        lines += ["| student | points |", "| --- | --- |"]
        for student, (points, most) in sorted(self.totals().items()):
            lines.append(f"| {student} | {points:g} / {most:g} |")
        lines += ["", "| student | exercise | points | passed | diagnosis |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for row in self.rows:
            diagnosis = "" if row.passed else _cell_text(row.check["likely_bug"] or "")
            passed = "yes" if row.passed else "no"
            lines.append(
                f"| {row.student} | {row.exercise} | {row.points:g} / {row.max_points:g} | "
                f"{passed} | {diagnosis} |"
            )
        lines += ["", "## Most common mistakes", ""]
        mistakes = self.common_mistakes()
        if not mistakes:
            lines.append("No exercise failed.")
        else:
            lines += ["| students | exercise | mistake | catalogued | who |"]
            lines.append("| --- | --- | --- | --- | --- |")
            for exercise, name, catalogued, students in mistakes:
                lines.append(
                    f"| {len(students)} | {exercise} | {_cell_text(name)} | "
                    f"{'yes' if catalogued else 'no'} | {', '.join(students)} |"
                )
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict:
        return {
            "assignments": list(self.assignments),
            "students": {
                student: {"points": points, "max_points": most}
                for student, (points, most) in sorted(self.totals().items())
            },
            "exercises": [dataclasses.asdict(row) for row in self.rows],
            "common_mistakes": [
                {"exercise": e, "mistake": m, "catalogued": c, "students": s}
                for e, m, c, s in self.common_mistakes()
            ],
        }

    def write(self, folder: str | Path) -> list[Path]:
        """Write <assignments>.md and .json, and the mistakes' bar chart .png when there are
        mistakes (needs matplotlib). -> the files written."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        base = folder / "+".join(self.assignments)
        written = [base.with_suffix(".md"), base.with_suffix(".json")]
        _write_atomically(written[0], self.markdown())
        _write_atomically(written[1], json.dumps(self.as_json(), indent=1, ensure_ascii=False))
        chart = base.with_suffix(".png")
        if self.common_mistakes():
            written.append(self.bar_chart(chart))
        else:
            chart.unlink(missing_ok=True)  # an earlier run's chart would no longer be true
        return written

    def bar_chart(self, path: Path) -> Path:
        """A horizontal bar per mistake: how many students made it."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                "the bar chart needs matplotlib: pip install 'glm-numpy[classroom]'"
            ) from None
        mistakes = self.common_mistakes()[::-1]  # the most common at the top
        labels = [
            textwrap.fill(f"{e}: {m}", 48, max_lines=3, placeholder=" …") for e, m, *_ in mistakes
        ]
        figure, axes = plt.subplots(figsize=(10, 1.5 + 0.6 * len(mistakes)))
        rows = range(len(mistakes))  # positions, not categories: equal labels stay apart
        axes.barh(rows, [len(s) for *_, s in mistakes], color="#c0504d")
        axes.set_yticks(rows, labels)
        axes.set_xlabel("students")
        axes.xaxis.get_major_locator().set_params(integer=True)
        figure.suptitle(f"Most common mistakes: {', '.join(self.assignments)}")
        figure.tight_layout()
        temporary = path.with_suffix(".png.part")
        figure.savefig(temporary, format="png", dpi=100)
        plt.close(figure)
        temporary.replace(path)
        return path


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".part")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


# ----------------------------------------------------------------------------- reading a course
def student_code(notebook_path: Path) -> str:
    """Every code cell of a student's notebook except nbgrader's test cells, as one script
    (IPython magics commented out)."""
    try:
        cells = json.loads(notebook_path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{notebook_path}: not a readable notebook ({error})") from None
    sources = []
    for cell in cells:
        grade_cell = cell.get("metadata", {}).get("nbgrader", {}).get("grade", False)
        if cell.get("cell_type") == "code" and not grade_cell:
            source = cell.get("source", "")
            sources.append(_without_magics(source if isinstance(source, str) else "".join(source)))
    return "\n\n".join(sources) + "\n"


def _without_magics(source: str) -> str:
    """IPython's %magic and !shell lines commented out: they are not Python."""
    lines = source.splitlines()
    return "\n".join(
        f"# {line}" if line.lstrip().startswith(("%", "!")) else line for line in lines
    )


def _diagnoses(notebook_path: Path, exercises: Sequence[str]) -> dict[str, dict]:
    """exercise -> result_record of the student's functions in the notebook."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "submission.py"
        script.write_text(student_code(notebook_path), encoding="utf-8")
        report = grade_file(script, list(exercises))
    return {result.name: result_record(result) for result in report.results}


def class_report(course_dir: str | Path, assignments: Sequence[str]) -> ClassReport:
    """The report over ``assignments`` of the nbgrader course at ``course_dir`` (autograded)."""
    chosen = [assignment_named(name) for name in assignments]  # unknown names fail first
    course = Path(course_dir)
    database = course / "gradebook.db"
    if not database.is_file():
        raise FileNotFoundError(
            f"{database}: no gradebook; run `nbgrader autograde ASSIGNMENT` in {course} first"
        )
    try:
        from nbgrader.api import Gradebook, MissingEntry
    except ImportError:
        raise ImportError(
            "reading the gradebook needs nbgrader: pip install 'glm-numpy[classroom]'"
        ) from None
    rows: list[ExerciseRow] = []
    try:
        gradebook = Gradebook(f"sqlite:///{database.resolve()}")
    except Exception as error:  # sqlalchemy's errors: whatever the file holds, say which file
        raise ValueError(f"{database}: not an nbgrader gradebook ({error})") from None
    with gradebook:
        for assignment in chosen:
            name = assignment.name
            try:
                submissions = gradebook.find_assignment(name).submissions
            except MissingEntry:
                raise KeyError(f"{course}: the gradebook has no assignment {name!r}") from None
            for submission in sorted(submissions, key=lambda s: s.student.id):
                student = submission.student.id
                grades = {g.name: g for notebook in submission.notebooks for g in notebook.grades}
                notebook = course / "autograded" / student / name / f"{name}.ipynb"
                if not notebook.is_file():
                    raise FileNotFoundError(f"{notebook}: missing; run `nbgrader autograde {name}`")
                checks = _diagnoses(notebook, assignment.exercises)
                for exercise in assignment.exercises:
                    cells = [grades.get(f"test-{exercise}-{part.id}") for part in PARTS[exercise]]
                    rows.append(
                        ExerciseRow(
                            student,
                            name,
                            exercise,
                            sum(g.score or 0 for g in cells if g is not None),
                            sum(part.points for part in PARTS[exercise]),
                            checks[exercise],
                        )
                    )
    return ClassReport(tuple(assignments), rows)
