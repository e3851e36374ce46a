"""write_tiny_checkpoint: the exact official layout, at tiny sizes."""

import json

import numpy as np
import pytest
import torch

from glm_numpy.checkpoint import load_checkpoint
from glm_numpy.checkpoint.synthetic import OFFICIAL_CONFIG
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.config import ChatGLM2Config
from glm_numpy.dtypes import to_float32
from glm_numpy.quantize import QuantizedWeight
from glm_numpy.testing import torch_to_numpy, write_tiny_checkpoint

LAYER_SUFFIXES = [
    "input_layernorm.weight",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "self_attention.dense.weight",
    "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_official_layout(tmp_path, fmt, dtype):
    directory = write_tiny_checkpoint(tmp_path, fmt=fmt, dtype=dtype)
    config_values = json.loads((directory / "config.json").read_text())
    assert set(OFFICIAL_CONFIG) <= set(config_values)
    assert config_values["torch_dtype"] == dtype
    config = ChatGLM2Config.from_json(directory)
    checkpoint = load_checkpoint(directory)
    validate_checkpoint(checkpoint, config)
    L, D, V = config.num_layers, config.hidden_size, config.padded_vocab_size
    names = [f"transformer.encoder.layers.{i}.{s}" for i in range(L) for s in LAYER_SUFFIXES]
    expected = {
        "transformer.embedding.word_embeddings.weight": (V, D),
        "transformer.rotary_pos_emb.inv_freq": (config.kv_channels // 4,),
        "transformer.encoder.final_layernorm.weight": (D,),
        "transformer.output_layer.weight": (V, D),
    }
    assert set(checkpoint) == set(expected) | set(names)
    for name, shape in expected.items():
        assert checkpoint[name].shape == shape
    qkv = checkpoint["transformer.encoder.layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)

    # shard names, index and one layer split across the two shards
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    index_name = (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    index = json.loads((directory / index_name).read_text())
    assert set(index["weight_map"].values()) == {
        f"{stem}-00001-of-00002.{fmt}",
        f"{stem}-00002-of-00002.{fmt}",
    }
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in checkpoint.values())
    split = [
        i for i in range(L) if len({index["weight_map"][n] for n in names if f".{i}." in n}) == 2
    ]
    assert split == [L // 2]


def test_values_keep_the_model_finite_and_logits_nontrivial(tmp_path):
    from glm_numpy import ChatGLM2

    model = ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path, dtype="float16"))
    logits = model.forward(np.arange(20))
    assert np.isfinite(logits).all()
    assert logits.std() > 0.3
    assert len(set(logits.argmax(-1).tolist())) > 1


def test_inv_freq_holds_the_real_values(tmp_path):
    checkpoint = load_checkpoint(write_tiny_checkpoint(tmp_path))
    R = 16 // 2
    expected = 1.0 / 10000 ** (np.arange(0, R, 2) / R)
    np.testing.assert_allclose(
        checkpoint["transformer.rotary_pos_emb.inv_freq"], expected, rtol=1e-6
    )


def test_same_seed_same_values_in_both_formats(tmp_path):
    a = load_checkpoint(write_tiny_checkpoint(tmp_path / "a", seed=3, fmt="bin", dtype="bfloat16"))
    b = load_checkpoint(write_tiny_checkpoint(tmp_path / "b", seed=3, dtype="bfloat16"))
    c = load_checkpoint(write_tiny_checkpoint(tmp_path / "c", seed=4, dtype="bfloat16"))
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not np.array_equal(
        a["transformer.output_layer.weight"], c["transformer.output_layer.weight"]
    )


def test_bin_shards_are_real_torch_files(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, fmt="bin", dtype="bfloat16")
    checkpoint = load_checkpoint(directory)
    state = torch.load(directory / "pytorch_model-00001-of-00002.bin", weights_only=True)
    for name, tensor in state.items():
        assert tensor.dtype == torch.bfloat16
        assert torch_to_numpy(tensor).tobytes() == checkpoint[name].tobytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_official_quantised_layout(tmp_path, bits):
    directory = write_tiny_checkpoint(tmp_path, fmt="bin", dtype="float16", quantization_bit=bits)
    config = ChatGLM2Config.from_json(directory)
    assert config.quantization_bit == bits
    checkpoint = load_checkpoint(directory)
    validate_checkpoint(checkpoint, config)
    p = "transformer.encoder.layers.1."
    for module, (rows, columns) in {
        "self_attention.query_key_value": (128, 64),
        "self_attention.dense": (64, 64),
        "mlp.dense_h_to_4h": (192, 64),
        "mlp.dense_4h_to_h": (64, 96),
    }.items():
        q = checkpoint[p + module + ".weight"]
        scale = checkpoint[p + module + ".weight_scale"]
        assert q.dtype == np.int8 and q.shape == (rows, columns // (2 if bits == 4 else 1))
        assert scale.dtype == np.float16 and scale.shape == (rows,)
        weight = QuantizedWeight(q, scale, bits).dequantize()
        assert np.isfinite(weight).all() and 0.5 < weight.std() * np.sqrt(columns) < 2
    # not quantised: embeddings, output layer, norms, qkv bias
    assert checkpoint["transformer.output_layer.weight"].dtype == np.float16
    assert checkpoint[p + "self_attention.query_key_value.bias"].dtype == np.float16
    assert to_float32(checkpoint[p + "input_layernorm.weight"]).mean() == pytest.approx(1, abs=0.1)


def test_config_overrides(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, num_layers=3, multi_query_group_num=4)
    config = ChatGLM2Config.from_json(directory)
    assert config.num_layers == 3 and config.num_kv_groups == 4
    validate_checkpoint(load_checkpoint(directory), config)
