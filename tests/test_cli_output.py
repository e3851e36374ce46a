"""How the command line behaves around its output: closed pipes, progress bars on stderr, the
first-run note, ``generate --json`` and ``warmup``."""

import json
import os
import subprocess
import sys

import pytest

from glm_numpy.cli import BROKEN_PIPE, FIRST_RUN_NOTE

CLI = [sys.executable, "-m", "glm_numpy.cli"]
BAR = "%|"  # what every tqdm bar line contains, and no other output does


def run_cli(*args, env=None):
    return subprocess.run(
        [*CLI, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        env=env,
    )  # fmt: skip


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize(
    "command",
    [["inspect"], ["generate", "To be, or not to be", "--max-new-tokens", "64", "--seed", "0"]],
    ids=["inspect", "generate"],
)
def test_a_closed_stdout_ends_the_command_quietly_with_status_141(command):
    """`glm-numpy inspect | head`: the reader is gone before the first line is written (it is
    closed straight away, long before the interpreter has started), so every write fails."""
    process = subprocess.Popen(
        [*CLI, *command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()
    _, stderr = process.communicate(timeout=240)
    stderr = stderr.decode()
    assert process.returncode == BROKEN_PIPE == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_progress_is_shown_with_the_flag_and_absent_by_default():
    prompt = "To be, or not to be: " * 40
    plain = run_cli("generate", prompt, "--max-new-tokens", "4", "--seed", "0")
    shown = run_cli("generate", prompt, "--max-new-tokens", "4", "--seed", "0", "--progress")
    quiet = run_cli("generate", prompt, "--max-new-tokens", "4", "--seed", "0", "--quiet")
    for result in (plain, shown, quiet):
        assert result.returncode == 0, result.stderr
    assert BAR not in plain.stderr  # stderr is a pipe here, not a terminal
    assert BAR not in quiet.stderr
    bar_lines = [line for line in shown.stderr.split("\r") if BAR in line]
    assert bar_lines and all(line.lstrip().startswith("prefill") for line in bar_lines)
    assert "tokens" in bar_lines[-1] and "tok/s" in shown.stderr
    # the bar stays on stderr: stdout holds the same text with or without it
    assert shown.stdout == plain.stdout == quiet.stdout


def test_perplexity_shows_its_windows_with_progress(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 30, encoding="utf-8")
    args = ["perplexity", str(text), "--window", "64", "--stride", "32"]
    shown = run_cli(*args, "--progress")
    plain = run_cli(*args)
    assert shown.returncode == 0 == plain.returncode, shown.stderr
    assert any("perplexity" in line and BAR in line for line in shown.stderr.split("\r"))
    assert BAR not in plain.stderr
    assert shown.stdout == plain.stdout


def test_generate_json_is_one_object_with_ids_counts_and_timings():
    result = run_cli("generate", "To be", "--json", "--greedy", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert record["prompt"] == "To be"
    assert record["prompt_tokens"] == len(record["prompt_token_ids"]) > 0
    assert record["generated_tokens"] == len(record["token_ids"]) <= 6
    assert record["stop_reason"] in ("eos", "length")
    assert set(record["timings"]) >= {"prefill_seconds", "decode_seconds", "load_seconds"}
    again = json.loads(run_cli("generate", "To be", "--json", "--greedy",
                               "--max-new-tokens", "6").stdout)  # fmt: skip
    assert again["token_ids"] == record["token_ids"] and again["text"] == record["text"]


def test_the_first_run_note_appears_once_when_kernels_compile_then_never(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}  # an empty cache
    args = ["generate", "To be", "--max-new-tokens", "2", "--seed", "0"]
    first, second = run_cli(*args, env=env), run_cli(*args, env=env)
    assert first.returncode == 0 == second.returncode, first.stderr + second.stderr
    assert first.stderr.count(FIRST_RUN_NOTE) == 1
    assert FIRST_RUN_NOTE not in second.stderr  # loaded from the cache the first run wrote
    quiet = run_cli(*args, "--quiet", env={**env, "NUMBA_CACHE_DIR": str(tmp_path / "other")})
    assert FIRST_RUN_NOTE not in quiet.stderr


def test_warmup_runs_every_weight_format():
    result = run_cli("warmup")
    assert result.returncode == 0, result.stderr
    for name in ("float16", "bfloat16", "int8", "int4", "int4-g16"):
        assert f"{name}:" in result.stdout
