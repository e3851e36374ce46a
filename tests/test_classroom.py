"""Classroom: partial credit, the nbgrader course, the class report, and the whole nbgrader loop
(generate, submit, autograde, feedback, report) with three fake students."""

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm_numpy.classroom import PARTS, check_part
from glm_numpy.classroom.course import ASSIGNMENTS, assignment_notebook, write_course
from glm_numpy.classroom.report import mistake_name, student_code
from glm_numpy.exercises import EXERCISE_NAMES, EXERCISES, check
from glm_numpy.exercises.lessons import lesson

ROOT = Path(__file__).resolve().parents[1]

# Two wrong answers a class really hands in, written as a student would.
ROTATE_HALF_ROTARY = """\
def rotary(x, positions):
    T, N, Dh = x.shape
    R = Dh // 2
    theta = 10000.0 ** (-np.arange(0, R, 2) / R)
    angles = positions[:, None] * theta
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    first, second = x[..., : R // 2], x[..., R // 2 : R]  # pairs (i, i + R/2)
    out = x.copy()
    out[..., : R // 2] = first * cos - second * sin
    out[..., R // 2 : R] = second * cos + first * sin
    return out
"""

UNMASKED_ATTENTION = """\
def attention(q, k, v):
    T, H, Dh = q.shape
    S, G, _ = k.shape
    k = np.repeat(k, H // G, axis=1)
    v = np.repeat(v, H // G, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)  # every query sees every key
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = weights / weights.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).astype(np.float32)
"""


def _function(source: str):
    namespace = {"np": np}
    exec(source, namespace)
    return next(v for k, v in namespace.items() if k in EXERCISE_NAMES)


def _solution(name: str) -> str:
    _, _, signature, body = lesson(name)
    return f"{signature}\n{body}\n"


# ----------------------------------------------------------------------------- parts
def test_a_right_answer_earns_every_part_of_every_exercise():
    assert set(PARTS) == set(EXERCISE_NAMES)
    for name, parts in PARTS.items():
        for part in parts:
            result = check_part(name, EXERCISES[name].reference, part.id)
            assert result.passed and result.points == part.points, result.message


def test_the_case_groups_cover_every_case_so_full_points_mean_the_check_passes():
    for name, parts in PARTS.items():
        assert len({p.id for p in parts}) == len(parts), name
        groups = [p for p in parts if p.selects]
        cases = EXERCISES[name].make_cases()
        for part in groups:
            assert any(part.selects(case) for case in cases), (name, part.id, "selects no case")
        for case in cases:
            assert any(part.selects(case) for part in groups), (name, case.label, "in no part")
        if name != "top_p":  # a set of ids has no dtype; every array output's dtype is a part
            assert parts[0].id == "shape", name


def test_partial_credit_for_a_rotate_half_rotary_and_an_unmasked_attention():
    rotary = _function(ROTATE_HALF_ROTARY)
    earned = {p.id: check_part("rotary", rotary, p.id) for p in PARTS["rotary"]}
    assert {k for k, r in earned.items() if r.passed} == {"shape", "pass-through"}
    failed = earned["pairing"]
    assert failed.points == 0 and "turned as a pair" in failed.message
    assert failed.message.endswith(check("rotary", rotary).message)  # the whole diagnosis
    attention = _function(UNMASKED_ATTENTION)
    earned = {p.id: check_part("attention", attention, p.id) for p in PARTS["attention"]}
    assert {k for k, r in earned.items() if r.passed} == {"shape", "decode"}


def test_a_float64_rotary_loses_only_the_shape_point():
    # check fails it (the model keeps float32); the values are right
    right = _function(_solution("rotary"))
    earned = {
        p.id: check_part("rotary", lambda x, pos: right(x, pos).astype(np.float64), p.id).passed
        for p in PARTS["rotary"]
    }
    assert earned == {
        "shape": False,
        "pass-through": True,
        "pairing": True,
        "angles": True,
        "long-positions": True,
    }


def test_a_stub_or_a_non_function_earns_nothing_and_says_why():
    def stub(x, positions):
        raise NotImplementedError

    result = check_part("rotary", stub, "shape")
    assert not result.passed and "NotImplementedError" in result.message
    assert "TODO stub" in result.message
    assert not check_part("rotary", None, "shape").passed
    with pytest.raises(KeyError, match="its parts are shape, pass-through"):
        check_part("rotary", stub, "no-such-part")


def test_mistake_names_come_from_the_catalogue():
    rotary = _function(ROTATE_HALF_ROTARY)
    name, catalogued = mistake_name("rotary", check("rotary", rotary).likely_bug)
    assert catalogued and "rotate half" in name and ";" not in name
    assert mistake_name("rotary", None) == (None, False)
    assert mistake_name("rotary", "the function is still the TODO stub: replace it") == (
        "the function is still the TODO stub",
        False,
    )


# ----------------------------------------------------------------------------- the course
def test_each_assignment_has_solution_cells_and_test_cells_worth_its_points():
    covered = []
    for assignment in ASSIGNMENTS.values():
        cells = assignment_notebook(assignment)["cells"]
        meta = [c["metadata"]["nbgrader"] for c in cells]
        assert len({m["grade_id"] for m in meta}) == len(cells)  # nbgrader needs unique ids
        solutions = ["".join(c["source"]) for c, m in zip(cells, meta) if m["solution"]]
        assert len(solutions) == len(assignment.exercises)
        for name, source in zip(assignment.exercises, solutions):
            assert "    ### BEGIN SOLUTION\n" in source and "    ### END SOLUTION\n" in source
            assert source.replace("    ### BEGIN SOLUTION\n", "").replace(
                "    ### END SOLUTION\n", ""
            ) == _solution(name)
        tests = [m for m in meta if m["grade"]]
        assert sum(m["points"] for m in tests) == assignment.points
        covered += assignment.exercises
    assert sorted(covered) == sorted(EXERCISE_NAMES)  # every exercise is in one assignment


def test_init_writes_the_course_and_keeps_the_teachers_config(tmp_path):
    course = tmp_path / "course"
    done = _cli("classroom", "init", str(course))
    assert done.returncode == 0, done.stderr
    for name in ASSIGNMENTS:
        assert (course / "source" / name / f"{name}.ipynb").is_file()
    config = course / "nbgrader_config.py"
    config.write_text(config.read_text() + "# my change\n")
    write_course(course)
    assert config.read_text().endswith("# my change\n")


def test_report_errors_are_one_line(tmp_path):
    done = _cli("classroom", "report", str(tmp_path), "rotary")
    assert done.returncode == 2 and "no gradebook" in done.stderr
    assert done.stderr.count("\n") == 1
    done = _cli("classroom", "report", str(tmp_path), "no-such-assignment")
    assert done.returncode == 2 and "the assignments are embedding-and-norm" in done.stderr
    pytest.importorskip("nbgrader")
    (tmp_path / "gradebook.db").write_text("not a database, but a note")
    done = _cli("classroom", "report", str(tmp_path), "rotary")
    assert done.returncode == 2 and "gradebook.db: not an nbgrader gradebook" in done.stderr


# ----------------------------------------------------------------------------- check --json
def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glm_numpy.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_check_json_grades_several_files(tmp_path):
    good, bad = tmp_path / "good.py", tmp_path / "bad.py"
    good.write_text("import numpy as np\n\n" + _solution("rotary"))
    bad.write_text("import numpy as np\n\n" + ROTATE_HALF_ROTARY)
    done = _cli("check", "--json", "--exercise", "rotary", str(good), str(bad))
    assert done.returncode == 1, done.stderr
    files = json.loads(done.stdout)
    assert [f["passed"] for f in files] == [True, False]
    record = files[1]["exercises"][0]
    assert record["exercise"] == "rotary" and record["catalogued"]
    assert "rotate half" in record["mistake"] and record["cases_passed"] == 0
    done = _cli("check", str(good), str(tmp_path / "missing.py"))
    assert done.returncode == 2 and "missing.py: no such file" in done.stderr


# ----------------------------------------------------------------------------- the nbgrader loop
STUDENTS = {  # student -> {exercise: source of the function}
    "alice": {},  # the model solution everywhere
    "bob": {"rotary": ROTATE_HALF_ROTARY},
    "carol": {"attention": UNMASKED_ATTENTION},
}
LOOP = ("rotary", "attention-and-kv-cache")


def _nbgrader(course: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=course,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def _submit(course: Path, student: str, assignment: str, functions: dict) -> None:
    """nbgrader's submitted layout: submitted/<student>/<assignment>/<notebook> + timestamp.txt"""
    released = course / "release" / assignment / f"{assignment}.ipynb"
    notebook = json.loads(released.read_text())
    for cell in notebook["cells"]:
        if cell["metadata"].get("nbgrader", {}).get("solution"):
            name = cell["metadata"]["nbgrader"]["grade_id"].removesuffix("-function")
            cell["source"] = functions.get(name, _solution(name))
    folder = course / "submitted" / student / assignment
    folder.mkdir(parents=True)
    (folder / f"{assignment}.ipynb").write_text(json.dumps(notebook))
    (folder / "timestamp.txt").write_text("2026-12-01 09:00:00.000000 UTC")


def _feedback_text(course: Path, student: str, assignment: str) -> str:
    page = (course / "feedback" / student / assignment / f"{assignment}.html").read_text()
    page = re.sub(r"<style.*?</style>", "", page, flags=re.DOTALL)
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_the_whole_nbgrader_loop_grades_three_students(tmp_path):
    pytest.importorskip("nbgrader")
    course = tmp_path / "course"
    assert _cli("classroom", "init", str(course)).returncode == 0
    for assignment in LOOP:
        _nbgrader(course, "generate_assignment", assignment, "--force")
        release = (course / "release" / assignment / f"{assignment}.ipynb").read_text()
        assert "### BEGIN SOLUTION" not in release and "raise NotImplementedError()" in release
        for student, functions in STUDENTS.items():
            _submit(course, student, assignment, functions)
        _nbgrader(course, "autograde", assignment, "--create")
        _nbgrader(course, "generate_feedback", assignment)

    done = _cli("classroom", "report", str(course), *LOOP)
    assert done.returncode == 0, done.stderr
    print(done.stdout)  # the report, for the record (pytest -s)
    base = course / "reports" / "+".join(LOOP)
    report = json.loads(base.with_suffix(".json").read_text())
    assert base.with_suffix(".png").read_bytes().startswith(b"\x89PNG")

    # Scores: full, partial, partial (rotary 5 + attention 5 + kv_cache_step 4 = 14 points).
    totals = {s: (v["points"], v["max_points"]) for s, v in report["students"].items()}
    assert totals == {"alice": (14, 14), "bob": (11, 14), "carol": (11, 14)}
    points = {(r["student"], r["exercise"]): r["points"] for r in report["exercises"]}
    assert points[("bob", "rotary")] == 2 and points[("carol", "attention")] == 2
    assert points[("carol", "kv_cache_step")] == 4

    # The class report counts each mistake once, under its catalogue name.
    rotate_half = mistake_name("rotary", check("rotary", _function(ROTATE_HALF_ROTARY)).likely_bug)
    no_mask = mistake_name(
        "attention", check("attention", _function(UNMASKED_ATTENTION)).likely_bug
    )
    common = {(m["exercise"], m["mistake"]): m["students"] for m in report["common_mistakes"]}
    assert common == {("rotary", rotate_half[0]): ["bob"], ("attention", no_mask[0]): ["carol"]}
    assert "rotate half" in rotate_half[0] and "causal mask" in no_mask[0]
    assert rotate_half[0] in done.stdout and no_mask[0] in done.stdout

    # Each feedback file names the right bug at the failing cell, and only that one.
    feedback = {s: {a: _feedback_text(course, s, a) for a in LOOP} for s in STUDENTS}
    assert "AssertionError" not in feedback["alice"]["rotary"] + feedback["alice"][LOOP[1]]
    assert rotate_half[0] in _grade_cell(feedback["bob"]["rotary"], "test-rotary-pairing")
    assert "Score: 2.0 / 5.0" in feedback["bob"]["rotary"]
    assert "AssertionError" not in feedback["bob"][LOOP[1]]
    assert no_mask[0] in _grade_cell(feedback["carol"][LOOP[1]], "test-attention-causal-groups")
    assert "AssertionError" not in _grade_cell(feedback["carol"][LOOP[1]], "test-attention-decode")
    assert "AssertionError" not in feedback["carol"]["rotary"]


def _grade_cell(feedback: str, grade_id: str) -> str:
    """The text of one test cell in a feedback page, its output included."""
    start = feedback.index(f"Grade cell: {grade_id}")
    end = feedback.find("Grade cell:", start + 1)
    return feedback[start : end if end > 0 else None]


def test_student_code_leaves_out_the_test_cells(tmp_path):
    notebook = assignment_notebook(ASSIGNMENTS["rotary"])
    path = tmp_path / "rotary.ipynb"
    path.write_text(json.dumps(notebook))
    code = student_code(path)
    assert "def rotary(x, positions):" in code and 'check_part("rotary"' not in code
    assert "from glm_numpy.classroom import check_part" in code
    notebook["cells"][1]["source"] = "%matplotlib inline\nimport numpy as np\n!ls"
    path.write_text(json.dumps(notebook))
    assert "# %matplotlib inline\nimport numpy as np\n# !ls" in student_code(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a readable notebook"):
        student_code(path)


def test_teaching_guide_names_the_commands_and_every_assignment():
    guide = (ROOT / "docs" / "teaching.md").read_text()
    for command in ("glm-numpy classroom init", "glm-numpy classroom report", "check --json"):
        assert command in guide
    for name, assignment in ASSIGNMENTS.items():  # the table of assignments is up to date
        row = (
            rf"\| `{name}` \| {', '.join(assignment.exercises)} \| [^|]+ \| {assignment.points} \|"
        )
        assert re.search(row, guide), name
    for notebook in {n for a in ASSIGNMENTS.values() for n in a.teaching}:
        assert (ROOT / "notebooks" / notebook).is_file(), notebook


def test_the_report_counts_mistakes_and_drops_a_stale_chart(tmp_path):
    from glm_numpy.classroom.report import ClassReport, ExerciseRow, result_record

    wrong = result_record(check("rotary", _function(ROTATE_HALF_ROTARY)))
    right = result_record(check("rotary", _function(_solution("rotary"))))
    rows = [
        ExerciseRow("ann", "rotary", "rotary", 2, 5, wrong),
        ExerciseRow("ben", "rotary", "rotary", 2, 5, wrong),
        ExerciseRow("cat", "rotary", "rotary", 5, 5, right),
    ]
    report = ClassReport(("rotary",), rows)
    assert report.common_mistakes() == [("rotary", wrong["mistake"], True, ["ann", "ben"])]
    assert report.totals()["cat"] == (5, 5)
    assert f"| 2 | rotary | {wrong['mistake']} | yes | ann, ben |" in report.markdown()
    written = report.write(tmp_path)
    assert [p.name for p in written] == ["rotary.md", "rotary.json", "rotary.png"]
    ClassReport(("rotary",), rows[2:]).write(tmp_path)
    assert not (tmp_path / "rotary.png").exists()
    assert "No exercise failed." in (tmp_path / "rotary.md").read_text()
