"""Write the exercise notebooks: one per exercise, a student version and a solved one.

    python notebooks/exercises/make_notebooks.py

Each notebook has a short explanation, a setup cell, the function cell (tagged "todo": the exact
signature with ``raise NotImplementedError``; in solutions/ tagged "solution": a working body)
and a cell calling ``glm_numpy.exercises.check``. The solved notebooks assert that the check
passes, so running them (``pytest --nbmake notebooks/exercises/solutions``) proves every checker
accepts a correct answer. Edit the exercises in glm_numpy/exercises/lessons.py (shared with the
classroom assignments), not in the .ipynb files, and re-run this script; the notebooks are
written without outputs.

The function names are the exercise names, so a student can also paste their functions into one
.py file and grade it with ``glm-numpy check FILE.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from glm_numpy.exercises.lessons import LESSONS

HERE = Path(__file__).resolve().parent

EXERCISES = LESSONS  # (name, explanation in markdown, signature line, solution body)

SETUP = "import numpy as np\n\nfrom glm_numpy.exercises import check"


def _cell(kind: str, source: str, cell_id: str, tags: list[str] | None = None) -> dict:
    cell = {
        "cell_type": kind,
        "id": cell_id,
        "metadata": {"tags": tags} if tags else {},
        "source": source.splitlines(keepends=True),
    }
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def notebook(number: int, name: str, text: str, signature: str, body: str, solved: bool) -> dict:
    title = f"# Exercise {number}: `{name}`\n\n"
    if solved:
        function = f"{signature}\n{body}\n"
        checking = (
            f'result = check("{name}", {name})\nprint(result)\nassert result.passed, result.message'
        )
        title = f"# Exercise {number}: `{name}` — solution\n\n"
    else:
        function = f"{signature}\n    # TODO: your code here\n    raise NotImplementedError\n"
        checking = f'check("{name}", {name})'
    cells = [
        _cell(
            "markdown",
            title + text + "\n\nWrite the function, then run the check below: it "
            "tries your function on many inputs and names the likely bug when one is wrong.",
            f"{name}-intro",
        ),
        _cell("code", SETUP, f"{name}-setup"),
        _cell("code", function, f"{name}-function", ["solution" if solved else "todo"]),
        _cell("code", checking, f"{name}-check"),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def main(folder: Path = HERE) -> None:
    """Write the student notebooks into ``folder`` and the solved ones into folder/solutions."""
    (folder / "solutions").mkdir(exist_ok=True)
    for number, (name, text, signature, body) in enumerate(EXERCISES, start=1):
        filename = f"{number:02d}-{name.replace('_', '-')}.ipynb"
        for destination, solved in ((folder, False), (folder / "solutions", True)):
            content = notebook(number, name, text, signature, body, solved)
            (destination / filename).write_text(
                json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )


if __name__ == "__main__":
    main()
