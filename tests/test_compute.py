"""compute="bf16": the AVX512-BF16 kernel equals its readable definition, the model and CLI take
the option, and a CPU without the instruction computes in float32 after saying so."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy import ChatGLM2, cli
from glm_numpy.compute import BF16Compute, round_to_bf16
from glm_numpy.dtypes import from_float32
from glm_numpy.kernels import bf16dot
from glm_numpy.layers.linear import linear, linear_reference
from glm_numpy.testing import write_tiny_checkpoint

needs_bf16 = pytest.mark.skipif(not bf16dot.HAS_AVX512_BF16, reason="no AVX512-BF16")


def close(actual, expected, tolerance=1e-5):
    assert actual.shape == expected.shape and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * np.abs(expected).max())


def test_round_to_bf16_keeps_8_significant_bits_ties_to_even():
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -3.0], dtype=np.float32)
    np.testing.assert_array_equal(round_to_bf16(values), [1.0, 1.0, 1 + 2**-6, 1.0, -3.0])


@needs_bf16
@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
@given(data=st.data())
def test_bf16_kernel_matches_its_definition(storage, data):
    """Ragged T (groups of 16 tokens, every tile shape), O (blocks of rows) and I (odd, and
    across blocks of packed column pairs) included."""
    T = data.draw(st.integers(1, 90), label="T")
    O = data.draw(st.integers(1, 200), label="O")
    I = data.draw(st.sampled_from([1, 32, 40, 200, 511, 512, 600, 1030]), label="I")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    w = rng.standard_normal((O, I)).astype(np.float32)
    weight = BF16Compute(
        w.astype(np.float16) if storage == "float16" else from_float32(w, "bfloat16")
    )
    x = rng.standard_normal((T, I)).astype(np.float32)
    close(linear(x, weight), linear_reference(x, weight))


@needs_bf16
def test_bf16_model_is_close_to_float32_and_not_equal(tmp_path):
    path = write_tiny_checkpoint(tmp_path, dtype="bfloat16")
    ids = np.arange(5, 17)
    exact = ChatGLM2.from_pretrained(path).forward(ids)
    rounded = ChatGLM2.from_pretrained(path, compute="bf16").forward(ids)
    assert not np.array_equal(exact, rounded)
    close(rounded, exact, 3e-2)


def test_unknown_compute_mode_is_a_clear_error(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="compute='fp8'"):
        ChatGLM2.from_pretrained(path, compute="fp8")


def test_without_avx512_bf16_the_model_says_so_and_computes_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(bf16dot, "HAS_AVX512_BF16", False)
    path = write_tiny_checkpoint(tmp_path, dtype="float16")
    with pytest.warns(UserWarning, match="no AVX512-BF16"):
        model = ChatGLM2.from_pretrained(path, compute="bf16")
    ids = np.arange(3, 9)
    np.testing.assert_array_equal(model.forward(ids), ChatGLM2.from_pretrained(path).forward(ids))


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["perplexity", "text.txt"]])
def test_cli_passes_compute_to_the_model(command, tmp_path, monkeypatch):
    """--compute reaches ChatGLM2.from_pretrained (the run stops there)."""
    seen = {}

    def from_pretrained(directory, **options):
        seen.update(options)
        raise KeyboardInterrupt  # main() turns it into exit code 130

    monkeypatch.setattr(ChatGLM2, "from_pretrained", from_pretrained)
    monkeypatch.setattr(cli, "open_tokenizer", lambda directory, config, family: FakeTokenizer())
    (tmp_path / "text.txt").write_text("some text to score")
    monkeypatch.chdir(tmp_path)
    model = write_tiny_checkpoint(tmp_path / "model")
    (model / "tokenizer.model").write_bytes(b"")  # never read: open_tokenizer is replaced
    assert cli.main([*command, "--model", str(model), "--compute", "bf16"]) == 130
    assert seen["compute"] == "bf16"


class FakeTokenizer:
    vocab_size = 100

    def encode(self, text):
        return [5, 6, 7]


def test_cli_rejects_an_unknown_compute_mode(capsys):
    assert cli.main(["generate", "hi", "--compute", "fp8"]) == 2
    assert "--compute: invalid choice: 'fp8'" in capsys.readouterr().err
