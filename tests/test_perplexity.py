"""Sliding-window perplexity: exp of the mean NLL, every token after the first scored once."""

import math
import shutil

import numpy as np
import pytest

from glm_numpy import ChatGLM2
from glm_numpy.cli import main
from glm_numpy.perplexity import perplexity, token_nll, window_starts
from glm_numpy.testing import write_tiny_checkpoint
from glm_numpy.tokenizer import ChatGLM2Tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def ids(model):
    return np.random.default_rng(0).integers(0, model.config.padded_vocab_size, 20)


def direct_nll(model, ids, context_start) -> float:
    """Mean NLL of ids[1:], token j predicted from ids[context_start(j) : j], one pass each."""
    nlls = []
    for j in range(1, len(ids)):
        logits = model.forward(ids[context_start(j) : j])[-1]  # [V]
        nlls.append(-(logits[ids[j]] - np.log(np.sum(np.exp(logits.astype(np.float64))))))
    return float(np.mean(nlls))


def test_one_window_is_exp_of_mean_nll_of_one_forward(model, ids):
    result = perplexity(model, ids, window=len(ids), stride=len(ids))
    expected = direct_nll(model, ids, context_start=lambda j: 0)
    assert result.scored_tokens == len(ids) - 1
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_sliding_windows_give_each_token_its_window_context(model, ids):
    """window 8, stride 5 over 20 tokens: windows start at 0, 5, 10, 15; token j is scored by the
    first window that reaches it, with the context from that window's start."""
    starts = window_starts(len(ids), window=8, stride=5)
    assert starts == [0, 5, 10, 15]
    first_window_reaching = {j: next(s for s in starts if j < s + 8) for j in range(1, len(ids))}
    expected = direct_nll(model, ids, context_start=first_window_reaching.get)
    result = perplexity(model, ids, window=8, stride=5)
    assert result.scored_tokens == len(ids) - 1
    assert (result.window, result.stride) == (8, 5)
    assert result.nll == pytest.approx(expected, rel=1e-5)


class UniformModel:
    """Predicts every one of V tokens with probability 1/V: its perplexity is exactly V."""

    def forward(self, ids):
        return np.zeros((len(ids), 37), np.float32)


def test_uniform_predictions_have_perplexity_vocab_size():
    result = perplexity(UniformModel(), np.arange(30) % 37, window=7, stride=3)
    assert result.perplexity == pytest.approx(37.0, rel=1e-12)


def test_token_nll_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], np.float32)
    assert token_nll(logits, np.array([0]))[0] == pytest.approx(0.0, abs=1e-12)
    assert token_nll(logits, np.array([1]))[0] == pytest.approx(1e4, rel=1e-9)


@pytest.mark.parametrize(
    "window, stride, length, message",
    [(8, 0, 10, "stride <= window"), (4, 5, 10, "stride <= window"), (8, 4, 1, "at least 2")],
)
def test_bad_arguments_are_clear_errors(window, stride, length, message):
    with pytest.raises(ValueError, match=message):
        perplexity(UniformModel(), np.zeros(length, np.int64), window, stride)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, real_tokenizer_path):
    """A tiny random checkpoint with the real vocabulary size, plus the real tokenizer."""
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("cli"), padded_vocab_size=65024)
    shutil.copy(real_tokenizer_path, directory / "tokenizer.model")
    return directory


def test_perplexity_command_reports_the_value_window_and_stride(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. 你好，世界！" * 3, encoding="utf-8"
    )
    assert main(["perplexity", str(text), "--model", str(model_dir), "--window", "16"]) == 2
    assert "--stride (256) <= --window (16)" in capsys.readouterr().err
    argv = ["perplexity", str(text), "--model", str(model_dir), "--window", "16", "--stride", "8"]
    assert main(argv) == 0
    ids = ChatGLM2Tokenizer.from_pretrained(model_dir).encode(text.read_text(encoding="utf-8"))
    expected = perplexity(ChatGLM2.from_pretrained(model_dir), ids, window=16, stride=8)
    printed = capsys.readouterr().out
    assert f"perplexity {expected.perplexity:.4f}" in printed
    assert f"over {len(ids) - 1} tokens" in printed and "window 16, stride 8" in printed
