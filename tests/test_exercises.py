"""The exercise checkers: they accept right answers, reject wrong ones with the right diagnosis,
and survive anything a student's function does.

The catalogue below holds realistic wrong implementations, written the way students write them
(independently of glm_numpy.exercises.mistakes), each with words its diagnosis must contain.
"""

import functools
import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glm_numpy.exercises import EXERCISE_NAMES, EXERCISES, check, grade_file, runner

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks" / "exercises"


def softmax_rows(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------- wrong student implementations
def embedding_scaled(ids, table):
    return table[ids] * np.sqrt(table.shape[1])


def embedding_one_based(ids, table):
    return table[ids - 1]


def rms_layernorm(x, weight, eps):
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps) * weight


def rms_eps_outside(x, weight, eps):
    return x / (np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) + eps) * weight


def rms_no_eps(x, weight, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) * weight


def rms_np_var(x, weight, eps):
    return x / np.sqrt(np.var(x, axis=-1, keepdims=True) + eps) * weight


def rms_eps_hardcoded(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight


def student_rotary(
    x,
    positions,
    pairing="interleaved",
    rotated="half",
    exponent_over="R",
    ignore_positions=False,
    sin_sign=1,
):
    T, N, Dh = x.shape
    R = Dh // 2 if rotated == "half" else Dh
    denominator = R if exponent_over == "R" else Dh
    pos = np.arange(T) if ignore_positions else positions
    theta = 1.0 / (10000 ** (np.arange(0, R, 2) / denominator))
    angle = pos[:, None] * theta
    cos, sin = np.cos(angle)[:, None, :], sin_sign * np.sin(angle)[:, None, :]
    out = x.copy()
    if pairing == "interleaved":
        a, b = x[..., 0:R:2], x[..., 1:R:2]
        out[..., 0:R:2] = a * cos - b * sin
        out[..., 1:R:2] = b * cos + a * sin
    else:  # NeoX rotate_half
        a, b = x[..., : R // 2], x[..., R // 2 : R]
        out[..., :R] = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    return out


def student_attention(
    q, k, v, expand="repeat", scale="sqrt", stable=True, mask="causal", fill=-np.inf
):
    T, H, Dh = q.shape
    S, G, _ = k.shape
    if expand == "repeat":
        k, v = np.repeat(k, H // G, axis=1), np.repeat(v, H // G, axis=1)
    else:
        k, v = np.tile(k, (1, H // G, 1)), np.tile(v, (1, H // G, 1))
    scores = np.einsum("thd,shd->hts", q, k)
    scores = scores / {"sqrt": np.sqrt(Dh), "dh": Dh, "none": 1}[scale]
    rows, cols = np.arange(S - T, S)[:, None], np.arange(S)[None, :]
    if mask == "multiply":  # masked scores become 0, not -inf
        scores = scores * (cols <= rows)
    else:
        allowed = {
            "causal": cols <= rows,
            "none": np.ones((T, S), bool),
            "tril": np.tril(np.ones((T, S), bool)),
            "strict": cols < rows,
        }[mask]
        scores = np.where(allowed, scores, fill)
    if stable:
        probs = softmax_rows(scores)
    else:
        e = np.exp(scores)
        probs = e / e.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", probs, v).astype(np.float32)


def student_swiglu(x, w1, w2, activation="silu", swap=False, transpose_down=False):
    u = x @ w1.T
    F = u.shape[1] // 2
    gate, up = (u[:, F:], u[:, :F]) if swap else (u[:, :F], u[:, F:])
    act = {
        "silu": lambda z: z / (1 + np.exp(-z)),
        "gelu": lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
        "relu": lambda z: np.maximum(z, 0),
    }[activation](gate)
    return (act * up) @ (w2 if transpose_down else w2.T)


def lm_head_softmax(x, w):
    return softmax_rows(x @ w.T)


def lm_head_untransposed(x, w):
    return x @ w


def _norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def student_block(x, positions, weights, num_heads, num_kv_groups, eps, bug=None):
    H, G, T = num_heads, num_kv_groups, x.shape[0]
    Dh = weights["self_attention.dense.weight"].shape[1] // H
    a = _norm(x, weights["input_layernorm.weight"], eps)
    qkv = a @ weights["self_attention.query_key_value.weight"].T
    if bug != "no_bias":
        qkv = qkv + weights["self_attention.query_key_value.bias"]
    q = qkv[:, : H * Dh].reshape(T, H, Dh)
    k = qkv[:, H * Dh : (H + G) * Dh].reshape(T, G, Dh)
    v = qkv[:, (H + G) * Dh :].reshape(T, G, Dh)
    pairing = "half" if bug == "rotate_half" else "interleaved"
    q, k = student_rotary(q, positions, pairing), student_rotary(k, positions, pairing)
    expand = "tile" if bug == "round_robin" else "repeat"
    context = student_attention(q, k, v, expand=expand).reshape(T, H * Dh)
    attn = context @ weights["self_attention.dense.weight"].T
    x1 = (a if bug == "residual_after_norm" else x) + attn
    m = _norm(x1, weights["post_attention_layernorm.weight"], eps)
    return x1 + student_swiglu(
        m, weights["mlp.dense_h_to_4h.weight"], weights["mlp.dense_4h_to_h.weight"]
    )


def student_kv_step(q, k, v, cache_k, cache_v, bug=None):
    S = cache_k.shape[0]
    position = np.array([S - 1 if bug == "position_minus_one" else S])
    q = student_rotary(q, position)
    if bug == "cache_before_rotary":
        cache_k = np.concatenate([cache_k, k])
        k = student_rotary(k, position)
    else:
        k = student_rotary(k, position)
        cache_k = np.concatenate([cache_k, k])
    cache_v = np.concatenate([cache_v, v])
    out = student_attention(q, cache_k, cache_v)
    return out if bug == "no_cache_returned" else (out, cache_k, cache_v)


def student_top_p(logits, p, bug=None):
    if bug == "unstable":
        e = np.exp(logits)
        probs = e / e.sum()
    else:
        probs = np.exp(logits - logits.max())
        probs = probs / probs.sum()
    order = np.argsort(probs) if bug == "ascending" else np.argsort(-probs)
    total = np.cumsum(probs[order])
    n = np.searchsorted(total, p) + (0 if bug == "exclusive" else 1)
    return set(order[:n].tolist())


p = functools.partial
WRONG = [
    ("embedding", embedding_scaled, "sqrt(D)"),
    ("embedding", embedding_one_based, "off by one"),
    ("rms_norm", rms_layernorm, "mean is subtracted"),
    ("rms_norm", rms_eps_outside, "eps is outside the square root"),
    ("rms_norm", rms_no_eps, "eps is missing"),
    ("rms_norm", rms_np_var, "np.var"),
    ("rms_norm", rms_eps_hardcoded, "eps argument is ignored"),
    ("rotary", p(student_rotary, pairing="half"), "rotate half"),
    ("rotary", p(student_rotary, rotated="all"), "all Dh channels are rotated"),
    ("rotary", p(student_rotary, pairing="half", rotated="all"), "all Dh channels rotate"),
    ("rotary", p(student_rotary, exponent_over="Dh"), "use the head dim"),
    ("rotary", p(student_rotary, ignore_positions=True), "positions argument is ignored"),
    ("rotary", p(student_rotary, sin_sign=-1), "wrong way"),
    ("attention", p(student_attention, expand="tile"), "round-robin"),
    ("attention", p(student_attention, scale="dh"), "1/Dh"),
    ("attention", p(student_attention, scale="none"), "not scaled"),
    ("attention", p(student_attention, stable=False), "not stabilised"),
    ("attention", p(student_attention, mask="none"), "mask is missing"),
    ("attention", p(student_attention, mask="tril"), "LAST T of the S positions"),
    ("attention", p(student_attention, mask="strict", fill=-1e9), "its own position"),
    ("attention", p(student_attention, mask="multiply"), "instead of -inf"),
    ("swiglu", p(student_swiglu, swap=True), "gate and up are swapped"),
    ("swiglu", p(student_swiglu, activation="gelu"), "GELU"),
    ("swiglu", p(student_swiglu, activation="relu"), "ReLU"),
    ("swiglu", p(student_swiglu, transpose_down=True), "transposed weight"),
    ("lm_head", lm_head_softmax, "softmax is applied"),
    ("lm_head", lm_head_untransposed, "transposed"),
    ("block", p(student_block, bug="no_bias"), "bias is not added"),
    ("block", p(student_block, bug="round_robin"), "round-robin"),
    ("block", p(student_block, bug="rotate_half"), "rotate half"),
    ("block", p(student_block, bug="residual_after_norm"), "residuals"),
    ("kv_cache_step", p(student_kv_step, bug="cache_before_rotary"), "before rotary"),
    ("kv_cache_step", p(student_kv_step, bug="position_minus_one"), "position is off by one"),
    ("kv_cache_step", p(student_kv_step, bug="no_cache_returned"), "return all 3 results"),
    ("top_p", p(student_top_p, bug="exclusive"), "AT LEAST p"),
    ("top_p", p(student_top_p, bug="ascending"), "least likely"),
    ("top_p", p(student_top_p, bug="unstable"), "large logits"),
]


@pytest.mark.parametrize(
    "name, wrong, diagnosis", WRONG, ids=[f"{n}-{d[:24]}" for n, _, d in WRONG]
)
def test_a_realistic_mistake_fails_with_its_diagnosis(name, wrong, diagnosis):
    with np.errstate(all="ignore"):
        result = check(name, wrong)
    assert not result.passed
    assert diagnosis in result.likely_bug, result.message
    assert diagnosis in result.message and "FAILED on case" in result.message


def test_the_catalogue_covers_every_exercise_with_enough_mistakes():
    assert len(WRONG) >= 25
    assert {name for name, _, _ in WRONG} == set(EXERCISE_NAMES)


@pytest.mark.parametrize("name", EXERCISE_NAMES)
def test_the_reference_passes_and_every_known_mistake_is_caught_and_named(name):
    exercise = EXERCISES[name]
    assert check(name, exercise.reference).passed
    for mistake in exercise.mistakes():
        result = check(name, mistake.function)
        assert not result.passed, mistake.diagnosis
        assert result.likely_bug == mistake.diagnosis, result.message


# ------------------------------------------------------------- misbehaving student functions
def _raises(x, weight, eps):
    raise ValueError("I give up")


def _loops_forever(x, weight, eps):
    while True:
        pass


@pytest.mark.parametrize(
    "student, expected",
    [
        (_raises, "ValueError: I give up"),
        (
            lambda x, w, eps: (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w).tolist(),
            "is a list, expected a numpy array",
        ),
        (lambda x, w, eps: np.mean(x, axis=-1), "has shape"),
        (
            lambda x, w, eps: (
                x.astype(np.float64)
                / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps)
                * w
            ),
            "dtype float64, expected float32 (the values are right)",
        ),
        (lambda x, w, eps: np.full_like(x, np.nan), "NaN"),
        (lambda x, w, eps: (y for y in x), "cannot be used"),
        (lambda x, w, eps: os._exit(3), "exit code 3"),
    ],
    ids=["raises", "list", "shape", "dtype", "nan", "generator", "exits"],
)
def test_a_misbehaving_function_gives_a_clear_result(student, expected):
    with np.errstate(all="ignore"):
        result = check("rms_norm", student)
    assert not result.passed
    assert expected in result.message
    assert "likely bug:" in result.message


def test_an_endless_loop_is_stopped_and_reported():
    start = time.perf_counter()
    result = check("rms_norm", _loops_forever, time_limit=0.5)
    assert time.perf_counter() - start < 5
    assert not result.passed and "within 0.5 s" in result.message
    assert "never ends" in result.likely_bug


def test_a_stub_and_a_non_function_are_reported():
    def rotary(x, positions):
        raise NotImplementedError

    assert "TODO stub" in check("rotary", rotary).likely_bug
    assert "pass the function itself" in check("rotary", np.zeros(3)).message
    with pytest.raises(KeyError, match="no exercise 'rope'"):
        check("rope", rotary)


@pytest.mark.parametrize("fork", [True, False], ids=["process", "threads"])
def test_a_function_that_changes_its_inputs_cannot_change_the_cases(fork, monkeypatch):
    monkeypatch.setattr(runner, "FORK_AVAILABLE", fork)

    def destructive(x, weight, eps):
        x[:] = 0
        return np.zeros_like(x)

    assert not check("rms_norm", destructive).passed
    assert check("rms_norm", EXERCISES["rms_norm"].reference).passed


def test_without_fork_the_threads_fallback_reports_errors_and_timeouts(monkeypatch):
    monkeypatch.setattr(runner, "FORK_AVAILABLE", False)
    assert "ValueError: I give up" in check("rms_norm", _raises).message
    assert check("rms_norm", EXERCISES["rms_norm"].reference).passed
    slow = check("rms_norm", lambda x, w, eps: time.sleep(1.0), time_limit=0.2)
    assert "within 0.2 s" in slow.message


# ------------------------------------------------------------- notebooks and grading files
def _notebook_cells(folder: Path, tag: str) -> str:
    """The source of every cell tagged ``tag`` in the folder's notebooks, as one Python file."""
    sources = ["import numpy as np\n"]
    for path in sorted(folder.glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if tag in cell["metadata"].get("tags", []):
                sources.append("".join(cell["source"]))
    return "\n\n".join(sources)


def test_the_notebooks_are_what_the_generator_writes(tmp_path):
    generator = runpy.run_path(str(NOTEBOOKS / "make_notebooks.py"), run_name="generator")
    generator["main"](tmp_path)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.ipynb"))
    assert len(written) == 2 * len(EXERCISE_NAMES)
    for relative in written:
        assert (tmp_path / relative).read_text() == (NOTEBOOKS / relative).read_text(), relative


def _run_check_command(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glm_numpy.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_check_command_passes_the_solutions(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(_notebook_cells(NOTEBOOKS / "solutions", "solution"))
    done = _run_check_command(good)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(EXERCISE_NAMES)} of {len(EXERCISE_NAMES)} exercises passed" in done.stdout


def test_check_command_fails_stubs_and_bugs(tmp_path):
    bad = tmp_path / "bad.py"
    stubs = _notebook_cells(NOTEBOOKS, "todo")
    bad.write_text(
        stubs + "\n\ndef rms_norm(x, weight, eps):\n"
        "    return x / (np.sqrt(np.mean(x**2, axis=-1, keepdims=True)) + eps) * weight\n"
    )
    done = _run_check_command(bad)
    assert done.returncode == 1
    assert "rms_norm: FAILED" in done.stdout and "outside the square root" in done.stdout
    assert "TODO stub" in done.stdout
    assert f"0 of {len(EXERCISE_NAMES)} exercises passed" in done.stdout


def test_grading_a_file_that_does_not_load_or_lacks_a_function(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def rotary(x, positions)\n    return x\n")
    report = grade_file(broken, ["rotary"])
    assert not report.passed and "SyntaxError" in report.format()
    partial = tmp_path / "partial.py"
    partial.write_text("def lm_head(x, w):\n    return x @ w.T\n")
    report = grade_file(partial, ["lm_head", "top_p"])
    assert [r.passed for r in report.results] == [True, False]
    assert "defines no function named 'top_p'" in report.results[1].message
    with pytest.raises(FileNotFoundError, match="no such file"):
        grade_file(tmp_path / "missing.py")
