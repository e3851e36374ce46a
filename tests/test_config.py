"""ChatGLM2Config reads the official config.json (spec §1.1) and refuses what it cannot compute."""

import json

import pytest

from glm_numpy import ChatGLM2Config, ConfigError
from glm_numpy.checkpoint.synthetic import OFFICIAL_CONFIG as OFFICIAL  # spec §1.1, every key


def write(tmp_path, values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_reads_the_official_config(tmp_path):
    config = ChatGLM2Config.from_json(write(tmp_path, OFFICIAL))
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (28, 4096, 13696)
    assert (config.num_attention_heads, config.num_kv_groups, config.head_dim) == (32, 2, 128)
    assert config.rotary_dim == 64 and config.qkv_size == 4608
    assert config.extra == {"_name_or_path": "THUDM/chatglm2-6b"}  # unknown keys are kept
    assert config.to_dict().items() >= OFFICIAL.items()  # nothing is lost on the way back


def test_a_directory_means_its_config_json(tmp_path):
    write(tmp_path, OFFICIAL)
    assert ChatGLM2Config.from_json(tmp_path).num_layers == 28


def test_absent_keys_take_the_config_class_defaults(tmp_path):
    config = ChatGLM2Config.from_json(write(tmp_path, {"num_layers": 2}))
    assert config.seq_length == 2048 and config.num_kv_groups == 32  # no multi-query: G = H


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rmsnorm", False, "rmsnorm=False: unsupported"),
        ("add_bias_linear", True, "add_bias_linear=True: unsupported"),
        ("apply_residual_connection_post_layernorm", True, "post-norm"),
        ("post_layer_norm", False, "final RMSNorm"),
        ("tie_word_embeddings", True, "separate output_layer"),
        ("pre_seq_len", 128, "P-tuning"),
        ("quantization_bit", 3, "0 \\(none\\), 4 or 8"),
        ("multi_query_group_num", 3, "must divide num_attention_heads"),
        ("hidden_size", 0, "positive integer"),
        ("kv_channels", 126, "multiple of 4"),
        ("layernorm_epsilon", -1.0, "positive finite"),
    ],
)
def test_unsupported_settings_are_refused_by_name(tmp_path, key, value, message):
    path = write(tmp_path, {**OFFICIAL, key: value})
    with pytest.raises(ConfigError, match=message) as error:
        ChatGLM2Config.from_json(path)
    assert str(path) in str(error.value)


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        ChatGLM2Config.from_json(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ChatGLM2Config.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ChatGLM2Config.from_json(bad)
