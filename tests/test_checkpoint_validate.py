"""Broken checkpoints: one CheckpointError that names the file and the tensor."""

import json
import re

import numpy as np
import pytest

from glm_numpy.checkpoint import CheckpointError, load_checkpoint, write_safetensors
from glm_numpy.checkpoint.safetensors_io import read_safetensors
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.config import ChatGLM2Config
from glm_numpy.testing import write_tiny_checkpoint

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
NORM = "transformer.encoder.layers.0.input_layernorm.weight"
QKV = "transformer.encoder.layers.0.self_attention.query_key_value.weight"


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_checkpoint(tmp_path / "tiny", dtype="float16")


def edit_shard(path, change):
    """Rewrite a shard with change(dict of copied arrays) applied."""
    tensors = {name: np.array(a) for name, a in read_safetensors(path).items()}
    change(tensors)
    write_safetensors(path, tensors)


def load_and_validate(directory):
    validate_checkpoint(load_checkpoint(directory), ChatGLM2Config.from_json(directory))


def error_of(directory) -> str:
    with pytest.raises(CheckpointError) as error:
        load_and_validate(directory)
    return str(error.value)


def test_the_pristine_checkpoint_passes(tiny):
    load_and_validate(tiny)


def test_wrong_shape(tiny):
    edit_shard(tiny / SHARD1, lambda t: t.update({QKV: t[QKV][:-1]}))
    message = error_of(tiny)
    assert SHARD1 in message and QKV in message and "shape [127, 64]" in message


def test_wrong_dtype(tiny):
    edit_shard(tiny / SHARD1, lambda t: t.update({QKV: t[QKV].astype(np.int32)}))
    message = error_of(tiny)
    assert SHARD1 in message and QKV in message and "dtype int32" in message


def test_int8_weights_without_quantization_bit(tiny):
    edit_shard(tiny / SHARD1, lambda t: t.update({QKV: t[QKV].astype(np.int8)}))
    assert "quantization_bit" in error_of(tiny)


def test_missing_tensor(tiny):
    edit_shard(tiny / SHARD1, lambda t: t.pop(NORM))
    message = error_of(tiny)
    assert NORM in message and SHARD1 in message  # the index maps it to shard 1


def test_missing_tensor_in_an_unindexed_file(tmp_path):
    directory = tmp_path / "single"
    directory.mkdir()
    tiny = write_tiny_checkpoint(tmp_path / "tiny", dtype="float16")
    merged = {**read_safetensors(tiny / SHARD1), **read_safetensors(tiny / SHARD2)}
    del merged[NORM]
    write_safetensors(directory / "model.safetensors", merged)
    (directory / "config.json").write_text((tiny / "config.json").read_text())
    assert f"missing tensor {NORM!r}" in error_of(directory)


def test_unexpected_tensor(tiny):
    edit_shard(tiny / SHARD2, lambda t: t.update({"lm_head.weight": np.zeros(3, np.float16)}))
    message = error_of(tiny)
    assert SHARD2 in message and "unexpected tensor 'lm_head.weight'" in message


def test_duplicated_across_shards(tiny):
    edit_shard(tiny / SHARD2, lambda t: t.update({NORM: np.ones(64, np.float16)}))
    message = error_of(tiny)
    assert "duplicated" in message and SHARD1 in message and SHARD2 in message and NORM in message


def test_index_names_a_missing_shard(tiny):
    (tiny / SHARD2).unlink()
    message = error_of(tiny)
    assert SHARD2 in message and "does not exist" in message


def test_index_with_a_path_outside_the_directory(tiny):
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][NORM] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    assert "not a plain file name" in error_of(tiny)


def test_index_total_size_mismatch(tiny):
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    assert "total_size" in error_of(tiny)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_norm_weight(tiny, value):
    def poison(tensors):
        tensors[NORM] = tensors[NORM].copy()
        tensors[NORM][5] = value

    edit_shard(tiny / SHARD1, poison)
    message = error_of(tiny)
    assert SHARD1 in message and NORM in message and "non-finite" in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_truncated_shard(tmp_path, fmt, keep):
    directory = write_tiny_checkpoint(tmp_path, fmt=fmt)
    shard = sorted(directory.glob(f"*-00002-of-00002.{fmt}"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    assert str(shard) in error_of(directory)


def test_config_for_another_size(tiny):
    config = ChatGLM2Config.from_json(tiny)
    config.hidden_size = 128
    with pytest.raises(CheckpointError) as error:
        validate_checkpoint(load_checkpoint(tiny), config)
    message = str(error.value)
    assert "D=128" in message and re.search(r"shape \[1024, 64\], expected \[1024, 128\]", message)
    assert "more" in message  # many problems, listed briefly in one error


def test_wrong_quantised_layout(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, dtype="float16", quantization_bit=4)
    config = ChatGLM2Config.from_json(directory)
    config.quantization_bit = 8  # int4-packed [O, I/2] weights read as int8 [O, I]
    with pytest.raises(CheckpointError, match=r"shape \[128, 32\], expected \[128, 64\]"):
        validate_checkpoint(load_checkpoint(directory), config)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.bin")
