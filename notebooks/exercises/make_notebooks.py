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

from glm_numpy.exercises.lessons import LESSONS, notebook_document

HERE = Path(__file__).resolve().parent

EXERCISES = LESSONS  # (name, explanation in markdown, signature line, solution body)

SETUP = "import numpy as np\n\nfrom glm_numpy.exercises import check"
STILL_TALKS = """# Does your model still talk? The whole default model, your {name} inside it:
from glm_numpy.exercises import run_with

run_with({{"{name}": {name}}}, "床前明月光")"""


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
            "tries your function on many inputs and names the likely bug when one is wrong "
            "(for a bug it has no name for, it says where and how your output is wrong).",
            f"{name}-intro",
        ),
        _cell("code", SETUP, f"{name}-setup"),
        _cell("code", function, f"{name}-function", ["solution" if solved else "todo"]),
        _cell("code", checking, f"{name}-check"),
        _cell("code", STILL_TALKS.format(name=name), f"{name}-whole-model"),
    ]
    return notebook_document(cells)


# A bug the checker has no name for, one per exercise: the solved notebook shows what the check
# says about it — where and how the output is wrong, and the step to re-read.
UNCATALOGUED = {
    "embedding": "def embedding(ids, table):\n    return table[(ids + 2) % len(table)]",
    "rms_norm": "def rms_norm(x, weight, eps):\n"
    "    return x / (np.mean(np.abs(x), axis=-1, keepdims=True) + eps) * weight",
    "rotary": "def rotary(x, positions):\n"
    "    R = x.shape[-1] // 2\n"
    "    angles = positions[:, None] * 10000.0 ** (-np.arange(0, R, 2) / R)\n"
    "    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]\n"
    "    even, odd = x[..., 0:R:2], x[..., 1:R:2]\n"
    "    out = x.copy()\n"
    "    out[..., 0:R:2] = even * cos - odd * sin\n"
    "    out[..., 1:R:2] = odd * cos + even * cos  # a typo: cos where sin belongs\n"
    "    return out",
    "attention": "from glm_numpy import layers\n\n\ndef attention(q, k, v):\n"
    "    T = q.shape[0]\n"
    "    return layers.attention(q, k[-T:], v[-T:])  # the cached keys are dropped",
    "swiglu": "def swiglu(x, w_h_to_4h, w_4h_to_h):\n"
    "    u = x @ w_h_to_4h.T\n"
    "    F = u.shape[-1] // 2\n"
    "    gate, up = u[:, :F], u[:, F:]\n"
    "    return (np.log1p(np.exp(gate)) * up) @ w_4h_to_h.T  # softplus, not silu",
    "lm_head": "def lm_head(x, w):\n"
    "    return x @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T  # rows of w normalised",
    "block": "from glm_numpy.exercises import references\n\n\n"
    "def block(x, positions, weights, num_heads, num_kv_groups, eps):\n"
    "    out = references.block(x, positions, weights, num_heads, num_kv_groups, eps)\n"
    "    return out - x  # as if the first residual were missing",
    "kv_cache_step": "from glm_numpy import layers\n\n\n"
    "def kv_cache_step(q, k, v, cache_k, cache_v):\n"
    "    S, G, Dh = cache_k.shape\n"
    "    cos, sin = layers.rotary_table(np.array([S]), Dh // 2)\n"
    "    q = layers.apply_rotary(q, cos, sin)\n"
    "    cos, sin = layers.rotary_table(np.array([S + 2]), Dh // 2)\n"
    "    k = layers.apply_rotary(k, cos, sin)\n"
    "    cache_k, cache_v = np.concatenate([cache_k, k]), np.concatenate([cache_v, v])\n"
    "    return layers.attention(q, cache_k, cache_v), cache_k, cache_v",
    "top_p": "def top_p(logits, p):\n"
    "    probs = np.exp(logits - logits.max())\n"
    "    probs /= probs.sum()\n"
    "    order = np.argsort(-probs)\n"
    "    kept = int(np.searchsorted(np.cumsum(probs[order]), p)) + 4  # three too many\n"
    "    return set(order[:kept].tolist())",
}


def uncatalogued_cells(name: str) -> list[dict]:
    """The solved notebook's last cells: a bug the checker has no name for, and its hint."""
    demo = (
        f"{UNCATALOGUED[name]}\n\n\n"
        f'result = check("{name}", {name})\n'
        "print(result.likely_bug)\n"
        'assert not result.passed and "recompute" not in result.likely_bug'
    )
    return [
        _cell(
            "markdown",
            "## A bug the checker has no name for\n\nWhen no known mistake matches, the check "
            "says where the output is wrong (which cases, rows, heads, channels) and how (a "
            "factor, a shift, values moved, an input used in another's place…), and which step "
            "to re-read:",
            f"{name}-uncatalogued-intro",
        ),
        _cell("code", demo, f"{name}-uncatalogued"),
    ]


def main(folder: Path = HERE) -> None:
    """Write the student notebooks into ``folder`` and the solved ones into folder/solutions."""
    (folder / "solutions").mkdir(exist_ok=True)
    for number, (name, text, signature, body) in enumerate(EXERCISES, start=1):
        filename = f"{number:02d}-{name.replace('_', '-')}.ipynb"
        for destination, solved in ((folder, False), (folder / "solutions", True)):
            content = notebook(number, name, text, signature, body, solved)
            if solved:
                content["cells"] += uncatalogued_cells(name)
            (destination / filename).write_text(
                json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
            )


if __name__ == "__main__":
    main()
