"""pytest --nbmake collection for notebooks/.

Every notebook here is executed top to bottom in CI, except the student versions of the
exercises (notebooks/exercises/*.ipynb): they contain TODO cells that are meant to fail until a
student fills them in. Their solutions (notebooks/exercises/solutions/*.ipynb) are executed.
"""

from pathlib import Path

HERE = Path(__file__).parent

# pathlib's glob does not descend into solutions/, unlike a collect_ignore_glob "*" pattern.
collect_ignore = [str(path.relative_to(HERE)) for path in HERE.glob("exercises/*.ipynb")]
