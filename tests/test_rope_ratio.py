"""rope_ratio, the -32K models' long-context setting, read as each family's code reads it and
checked against transformers' GlmForCausalLM (tests/oracle.py): ChatGLM2-6B-32K divides the
positions by it (transformers' linear rope scaling), ChatGLM3-6B-32K multiplies the rotary base
(rope_theta = 10000 x rope_ratio). Which one a directory is comes from its files
(glm_numpy.family) or from family=."""

import json

import numpy as np
import pytest
import torch
from oracle import glm_oracle, rotary_inverse_frequencies

from glm_numpy import ChatGLM2, ChatGLM2Config
from glm_numpy.config import ConfigError
from glm_numpy.family import FamilyError
from glm_numpy.layers import rotary_table
from glm_numpy.testing import write_tiny_checkpoint

T = 2048  # tokens: long enough that positions/16 and base 10000x50 turn far from plain rotary
MAX_RELATIVE_ERROR = 1e-5


def tiny_32k(tmp_path, ratio, **config):
    return write_tiny_checkpoint(tmp_path, seed=3, rope_ratio=ratio, seq_length=32768, **config)


def relative_difference(model, oracle, ids):
    ours = model.forward(ids)
    with torch.no_grad():
        theirs = oracle(torch.from_numpy(ids)[None]).logits[0].numpy()
    return np.abs(ours - theirs).max() / np.abs(theirs).max()


@pytest.mark.parametrize(
    "name_or_path, ratio, scales",
    [("THUDM/chatglm2-6b-32k", 16, "positions"), ("THUDM/chatglm3-6b-32k", 50, "base")],
)
def test_each_32k_variant_matches_the_oracle(tmp_path, name_or_path, ratio, scales):
    directory = tiny_32k(tmp_path, ratio, _name_or_path=name_or_path)
    model = ChatGLM2.from_pretrained(directory)
    assert model.config.rope_ratio_scales == scales
    oracle = glm_oracle(model.config, model.weights)
    ids = np.random.default_rng(7).integers(0, model.config.padded_vocab_size, T)
    assert relative_difference(model, oracle, ids) <= MAX_RELATIVE_ERROR
    # and the oracle is not blind to rope_ratio: plain rotary gives other logits
    plain = ChatGLM2Config.from_dict({**model.config.to_dict(), "rope_ratio": 1})
    assert relative_difference(model, glm_oracle(plain, model.weights), ids[:256]) > 1e-3


def test_the_two_readings_are_the_functions_their_code_computes():
    positions, R = np.arange(0, 32768, 1024), 64
    i = np.arange(R // 2)
    cos, sin = rotary_table(positions, R, position_divisor=16.0)  # ChatGLM2-6B-32K
    angles = positions[:, None] / 16.0 * 10000.0 ** (-2 * i / R)
    np.testing.assert_allclose(np.arctan2(sin, cos), np.angle(np.exp(1j * angles)), atol=2e-6)
    cos, sin = rotary_table(positions, R, base=10000.0 * 50)  # ChatGLM3-6B-32K
    angles = positions[:, None] * (10000.0 * 50) ** (-2 * i / R)
    np.testing.assert_allclose(np.arctan2(sin, cos), np.angle(np.exp(1j * angles)), atol=2e-6)


def test_the_oracle_rotates_half_of_each_head_with_the_scaled_base(tmp_path):
    model = ChatGLM2.from_pretrained(tiny_32k(tmp_path, 50), family="chatglm3")
    frequencies = rotary_inverse_frequencies(glm_oracle(model.config, model.weights)).numpy()
    R = model.config.rotary_dim
    np.testing.assert_allclose(frequencies, 500000.0 ** (-np.arange(0, R, 2) / R), rtol=1e-6)


@pytest.mark.parametrize(
    "modeling_line, scales",
    [
        ("base = base * self.rope_ratio", "base"),
        (
            "seq_idx = torch.arange(seq_len, dtype=dtype, device=device) / self.rope_ratio",
            "positions",
        ),
    ],
)
def test_the_shipped_modeling_code_decides(tmp_path, modeling_line, scales):
    directory = tiny_32k(tmp_path, 8, _name_or_path="my-finetune")
    (directory / "modeling_chatglm.py").write_text(f"        {modeling_line}\n")
    assert ChatGLM2Config.from_json(directory / "config.json").rope_ratio_scales == scales


def test_family_overrides_the_directory(tmp_path):
    directory = tiny_32k(tmp_path, 16, _name_or_path="THUDM/chatglm2-6b-32k")
    config = ChatGLM2Config.from_json(directory, family="chatglm3")
    assert (config.rotary_base, config.rotary_position_divisor) == (160000.0, 1.0)
    config = ChatGLM2Config.from_json(directory)
    assert (config.rotary_base, config.rotary_position_divisor) == (10000.0, 16.0)


def test_a_directory_that_does_not_say_is_refused_by_name(tmp_path):
    directory = tiny_32k(tmp_path, 16, _name_or_path="my-finetune")
    with pytest.raises(FamilyError, match=r"rope_ratio=16: .*--family chatglm2\|chatglm3"):
        ChatGLM2.from_pretrained(directory)


def test_absent_or_one_changes_nothing(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "a", _name_or_path="my-finetune")
    config = ChatGLM2Config.from_json(directory)
    assert config.rope_ratio is None and "rope_ratio" not in config.to_dict()
    assert (config.rotary_base, config.rotary_position_divisor) == (10000.0, 1.0)
    one = ChatGLM2Config.from_json(tiny_32k(tmp_path / "b", 1, _name_or_path="my-finetune"))
    assert (one.rotary_base, one.rotary_position_divisor) == (10000.0, 1.0)


@pytest.mark.parametrize("bad", [0, -2, "16", True, float("inf")])
def test_a_bad_rope_ratio_is_refused_by_name(tmp_path, bad):
    path = tmp_path / "config.json"
    values = json.loads((write_tiny_checkpoint(tmp_path / "m") / "config.json").read_text())
    path.write_text(json.dumps({**values, "rope_ratio": bad}))
    with pytest.raises(ConfigError, match="rope_ratio"):
        ChatGLM2Config.from_json(path, family="chatglm2")
