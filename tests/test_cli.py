"""The glm-numpy command, run as a subprocess (as a user runs it) on a tiny random model.

Python start-up with numpy costs about a second, so the bad-input runs are started together
and checked one by one.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer
from glm_numpy.cli import main, parameter_count, reply_to
from glm_numpy.generation import GenerationConfig, chat, generate
from glm_numpy.testing import write_tiny_checkpoint

CLI = [sys.executable, "-m", "glm_numpy.cli"]


def run_cli(*args, stdin=""):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, real_tokenizer_path):
    """A tiny random checkpoint with the real vocabulary size, plus the real tokenizer."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("cli"), padded_vocab_size=65024)
    shutil.copy(real_tokenizer_path, directory / "tokenizer.model")
    return directory


def broken_copies(model_dir, root):
    """Model directories that are each wrong in one way."""
    no_config, no_tokenizer, bad_config, bad_shard = (
        root / name for name in ("no_config", "no_tokenizer", "bad_config", "bad_shard")
    )
    for directory in (no_config, no_tokenizer, bad_config, bad_shard):
        shutil.copytree(model_dir, directory)
    (no_config / "config.json").unlink()
    (no_tokenizer / "tokenizer.model").unlink()
    values = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**values, "rmsnorm": False}))
    shard = next(bad_shard.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    return no_config, no_tokenizer, bad_config, bad_shard


BAD_INPUTS = {
    "empty prompt": (["generate", "  "], "the prompt is empty"),
    "prompt too long": (["generate", "word " * 600], "too long for this model's seq_length of 512"),
    "temperature 0": (["generate", "hi", "--temperature", "0"], "temperature=0.0: must be > 0"),
    "top_p 0": (["generate", "hi", "--top-p", "0"], r"top_p=0.0: must be in (0, 1]"),
    "top_p above 1": (["chat", "--top-p", "1.5"], r"top_p=1.5: must be in (0, 1]"),
    "top_k negative": (["generate", "hi", "--top-k", "-1"], "top_k=-1: must be an integer >= 0"),
    "not a number": (["generate", "hi", "--top-k", "x"], "argument --top-k: invalid int value"),
    "no config.json": (["generate", "hi"], "no config.json in this directory"),
    "no tokenizer.model": (["chat"], "no tokenizer.model in this directory"),
    "bad config": (["generate", "hi"], "rmsnorm=False: unsupported"),
    "bad shard": (["inspect"], "model-00001-of-00002.safetensors"),
}
BROKEN_DIR = {
    "no config.json": 0,
    "no tokenizer.model": 1,
    "bad config": 2,
    "bad shard": 3,
}


@pytest.fixture(scope="module")
def bad_input_runs(model_dir, tmp_path_factory):
    """Every bad-input command line, run at the same time -> {case: (returncode, stderr)}."""
    broken = broken_copies(model_dir, tmp_path_factory.mktemp("broken"))
    processes = {}
    for case, (args, _) in BAD_INPUTS.items():
        directory = broken[BROKEN_DIR[case]] if case in BROKEN_DIR else model_dir
        command = [*CLI, *args, "--model", str(directory)]
        processes[case] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    return {case: (p.wait(timeout=120), p.communicate()[1]) for case, p in processes.items()}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_code_2(bad_input_runs, case):
    returncode, stderr = bad_input_runs[case]
    assert returncode == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("glm-numpy: error: "), stderr
    assert BAD_INPUTS[case][1] in stderr


def test_generate_streams_the_greedy_continuation_and_reports_speeds(model_dir):
    result = run_cli("generate", "你好", "--model", str(model_dir), "--greedy",
                     "--max-new-tokens", "8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tokenizer = (
        ChatGLM2.from_pretrained(model_dir),
        ChatGLM2Tokenizer(model_dir / "tokenizer.model"),
    )
    config = GenerationConfig(do_sample=False, max_new_tokens=8, vocab_limit=tokenizer.vocab_size)
    expected = tokenizer.decode(generate(model, tokenizer.encode("你好"), config))
    assert result.stdout == expected + "\n"
    assert "prefill: 4 tokens in" in result.stderr and "decode: " in result.stderr
    assert result.stderr.count("tokens/s") == 2


def test_seeded_sampling_repeats_across_processes(model_dir):
    result = run_cli("generate", "Hello", "--model", str(model_dir), "--seed", "3",
                     "--temperature", "1.2", "--max-new-tokens", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tokenizer = (
        ChatGLM2.from_pretrained(model_dir),
        ChatGLM2Tokenizer.from_pretrained(model_dir),
    )
    config = GenerationConfig(
        temperature=1.2, max_new_tokens=6, seed=3, vocab_limit=tokenizer.vocab_size
    )
    expected = tokenizer.decode(generate(model, tokenizer.encode("Hello"), config))
    assert result.stdout == expected + "\n" and expected.strip()


def test_generate_with_the_chat_template_prints_the_chat_reply(model_dir, capsys):
    args = ["generate", "你好", "--model", str(model_dir), "--greedy", "--max-new-tokens", "5"]
    assert main([*args, "--chat-template"]) == 0
    model, tokenizer = (
        ChatGLM2.from_pretrained(model_dir),
        ChatGLM2Tokenizer.from_pretrained(model_dir),
    )
    response, _ = chat(model, tokenizer, "你好", do_sample=False, max_new_tokens=5)
    assert capsys.readouterr().out == response + "\n"


def test_chat_session_commands_and_eof(model_dir):
    stdin = "你好\n/history\n/nonsense\n/clear\n/history\nAgain\n"  # then EOF
    result = run_cli("chat", "--model", str(model_dir), "--greedy", "--max-new-tokens", "4",
                     stdin=stdin)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("ChatGLM: ") >= 3  # two replies and one history entry
    assert "[Round 1]\nUser: 你好\nChatGLM: " in out
    assert "unknown command /nonsense" in out
    assert out.index("(conversation cleared)") < out.index("(no history)")


def read_until(stream_fd, marker: bytes, timeout: float) -> bytes:
    """A child's output up to `marker`; fails (never blocks) after `timeout` s or at its EOF."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([stream_fd], [], [], max(deadline - time.monotonic(), 0))
        assert ready, f"no {marker!r} within {timeout} s in {seen!r}"
        chunk = os.read(stream_fd, 4096)
        assert chunk, f"the process ended without {marker!r}: {seen!r}"
        seen += chunk
    return seen


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_ctrl_c_interrupts_the_reply_not_the_session(model_dir):
    # Seeded, so the reply is the same long one every run; Ctrl-C as soon as it starts, so it
    # cannot end on its own first (with a sleep, a tiny model's reply sometimes did, and the
    # Ctrl-C then landed at the next prompt).
    command = [*CLI, "chat", "--model", str(model_dir), "--seed", "0", "--max-new-tokens", "400"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        process.stdin.write(b"Tell me a long story\n")
        process.stdin.flush()
        read_until(process.stdout.fileno(), b"ChatGLM: ", timeout=60)
        process.send_signal(signal.SIGINT)
        read_until(process.stdout.fileno(), b"[interrupted]", timeout=60)
        out, err = process.communicate(b"/history\n/exit\n", timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert b"[Round 1]\nUser: Tell me a long story" in out


def test_interrupted_reply_is_reported_and_swallowed(capsys):
    class Session:
        def stream(self, query, role="user"):
            yield "Hel"
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the next token is computed
            yield "Hello"
            yield "Hello, world"  # never reached: the reply stops at the token after Ctrl-C

    handler = signal.getsignal(signal.SIGINT)
    reply_to(Session(), "q")
    assert capsys.readouterr().out == "ChatGLM: Hello [interrupted]\n"
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C outside a reply is as before


def test_make_random_checkpoint_convert_and_inspect(tmp_path, capsys):
    random_dir, converted = tmp_path / "random", tmp_path / "converted"
    args = ["make-random-checkpoint", str(random_dir), "--size", "tiny", "--format", "bin"]
    assert main(args) == 0
    assert main(["convert", str(random_dir), str(converted), "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--model", str(converted)]) == 0
    out = capsys.readouterr().out
    from glm_numpy.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(converted)
    for name, array in checkpoint.items():
        assert f"{name} " in out and f" {array.nbytes:,}" in out
    assert "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight" in out
    assert "float32" in out and "num_layers: 2" in out
    count = sum(int(np.prod(a.shape)) for a in checkpoint.values())
    assert f"{count:,} parameters" in out
    assert main(["convert", str(random_dir), str(converted)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_parameter_count_of_a_4_bit_checkpoint_counts_two_per_byte(tmp_path):
    from glm_numpy.checkpoint import load_checkpoint
    from glm_numpy.config import ChatGLM2Config

    directory = write_tiny_checkpoint(tmp_path / "q4", quantization_bit=4)
    plain = write_tiny_checkpoint(tmp_path / "fp", quantization_bit=0)
    quantised = load_checkpoint(directory)
    scales = sum(a.size for n, a in quantised.items() if n.endswith("_scale"))
    config = ChatGLM2Config.from_json(directory)
    expected = parameter_count(load_checkpoint(plain), ChatGLM2Config.from_json(plain)) + scales
    assert parameter_count(quantised, config) == expected


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, real_tokenizer_path, capsys):
    directory = write_tiny_checkpoint(tmp_path / "small_vocab")  # 1024 embedding rows
    shutil.copy(real_tokenizer_path, directory / "tokenizer.model")
    assert main(["generate", "hi", "--model", str(directory)]) == 2
    assert "tokenizer.model has 64794 ids but the model only 1024" in capsys.readouterr().err
