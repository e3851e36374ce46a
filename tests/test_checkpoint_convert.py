"""convert and make-random-checkpoint: official layout, identical logits, no partial output."""

import json
import re

import numpy as np
import pytest

from glm_numpy.checkpoint import CheckpointError, load_checkpoint
from glm_numpy.checkpoint.convert import convert_checkpoint, make_random_checkpoint
from glm_numpy.checkpoint.layout import official_tensors
from glm_numpy.checkpoint.synthetic import (
    OFFICIAL_MAX_SHARD_BYTES,
    greedy_shards,
    random_config,
    tensor_nbytes,
)
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.config import ChatGLM2Config
from glm_numpy.dtypes import from_float32, to_float32
from glm_numpy.testing import write_tiny_checkpoint


def shard_number(path: str) -> str:
    return re.search(r"-(\d{5})-of-", path).group(1)


def test_bin_to_safetensors_gives_identical_logits(tmp_path):
    from glm_numpy import ChatGLM2

    source = write_tiny_checkpoint(tmp_path / "bin", fmt="bin", dtype="bfloat16", seed=7)
    target = convert_checkpoint(source, tmp_path / "st", progress=False)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    ids = np.array([3, 141, 59, 26, 535, 89, 79, 323])
    before = ChatGLM2.from_pretrained(source).forward(ids)
    after = ChatGLM2.from_pretrained(target).forward(ids)
    np.testing.assert_array_equal(before, after)


def test_tensors_and_shard_split_are_kept(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "bin", fmt="bin", dtype="float16")
    target = convert_checkpoint(source, tmp_path / "st", progress=False)
    a, b = load_checkpoint(source), load_checkpoint(target)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes()
        assert shard_number(a.source(name)) == shard_number(b.source(name))
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == b.nbytes


@pytest.mark.parametrize("source_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtype_conversion(tmp_path, source_dtype, dtype):
    source = write_tiny_checkpoint(tmp_path / "src", dtype=source_dtype, fmt="bin")
    target = convert_checkpoint(source, tmp_path / "dst", dtype=dtype, progress=False)
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == dtype
    a, b = load_checkpoint(source), load_checkpoint(target)
    validate_checkpoint(b, ChatGLM2Config.from_json(target))
    for name in a:
        expected = from_float32(to_float32(a[name]), dtype)
        assert b[name].dtype == expected.dtype
        np.testing.assert_array_equal(b[name], expected)


def test_quantised_weights_and_scales_are_copied_unchanged(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "q", fmt="bin", dtype="float16", quantization_bit=4)
    target = convert_checkpoint(source, tmp_path / "dst", dtype="bfloat16", progress=False)
    b = load_checkpoint(target)
    validate_checkpoint(b, ChatGLM2Config.from_json(target))
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h"
    assert b[name + ".weight"].dtype == np.int8
    assert b[name + ".weight_scale"].dtype == np.float16
    assert b["transformer.output_layer.weight"].dtype == np.uint16  # bfloat16


def test_side_files_are_copied(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "src", fmt="bin")
    (source / "tokenizer.model").write_bytes(b"sp")
    target = convert_checkpoint(source, tmp_path / "dst", progress=False)
    assert (target / "tokenizer.model").read_bytes() == b"sp"
    assert not list(target.glob("*.bin"))


def test_existing_destination_is_refused(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(source, tmp_path / "dst", progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        make_random_checkpoint(tmp_path / "dst", size="tiny", progress=False)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    source = write_tiny_checkpoint(tmp_path / "src", fmt="bin")
    import glm_numpy.checkpoint.convert as convert

    calls = []

    def failing_cast(array, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return cast(array, dtype)

    cast = convert.cast_in_chunks
    monkeypatch.setattr(convert, "cast_in_chunks", failing_cast)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(source, tmp_path / "dst", dtype="float16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_invalid_source_is_reported_before_writing(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "src", fmt="bin")
    config = json.loads((source / "config.json").read_text())
    config["num_layers"] = 3
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing tensor"):
        convert_checkpoint(source, tmp_path / "dst", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_make_random_tiny(tmp_path, fmt):
    target = make_random_checkpoint(
        tmp_path / "r", size="tiny", fmt=fmt, dtype="bfloat16", progress=False
    )
    validate_checkpoint(load_checkpoint(target), ChatGLM2Config.from_json(target))
    if fmt == "bin":  # our own torch-zip writer, read back by torch itself
        import torch

        from glm_numpy.testing import torch_to_numpy

        checkpoint = load_checkpoint(target)
        for shard in target.glob("*.bin"):
            for name, tensor in torch.load(shard, weights_only=True).items():
                assert torch_to_numpy(tensor).tobytes() == checkpoint[name].tobytes()


def test_6b_plan_is_the_official_one():
    """Without writing 12 GB: the 6b names, shapes, byte total and shard split (spec §2.1)."""
    config = ChatGLM2Config.from_dict(random_config("6b", "float16"))
    specs = official_tensors(config)
    assert len(specs) == 200
    assert sum(tensor_nbytes(s, "float16") for s in specs) == 12_487_168_064
    shards = greedy_shards(specs, "float16", OFFICIAL_MAX_SHARD_BYTES)
    assert [len(s) for s in shards] == [28, 31, 33, 34, 31, 33, 10]
    names = [[s.name for s in shard] for shard in shards]
    # layer 3: attention + norms in shard 1, MLP in shard 2; layer 12's dense_4h_to_h in shard 4
    assert "transformer.encoder.layers.3.post_attention_layernorm.weight" in names[0]
    assert "transformer.encoder.layers.3.mlp.dense_h_to_4h.weight" in names[1]
    assert "transformer.encoder.layers.12.mlp.dense_h_to_4h.weight" in names[2]
    assert "transformer.encoder.layers.12.mlp.dense_4h_to_h.weight" in names[3]
    shapes = {s.name: s.shape for s in specs}
    assert shapes["transformer.encoder.layers.0.self_attention.query_key_value.weight"] == (
        4608,
        4096,
    )
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (27392, 4096)
    assert shapes["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] == (4096, 13696)
    assert shapes["transformer.rotary_pos_emb.inv_freq"] == (32,)


def test_shards_keep_their_numbers_when_names_sort_differently(tmp_path):
    """The index's weight_map is sorted by tensor name, which is not shard order (in the
    official index, final_layernorm of shard 7 sorts second); files must follow their numbers."""
    from glm_numpy.checkpoint import write_safetensors
    from glm_numpy.checkpoint.synthetic import write_index

    source = tmp_path / "src"
    source.mkdir()
    layout = {1: ["z.first"], 2: ["b.second", "y.second"], 3: ["a.third"]}
    weight_map = {}
    for k, names in layout.items():
        file_name = f"model-{k:05d}-of-00003.safetensors"
        write_safetensors(source / file_name, {n: np.full(2, k, np.float32) for n in names})
        weight_map.update(dict.fromkeys(names, file_name))
    write_index(source, "safetensors", weight_map, 4 * 8)
    checkpoint = load_checkpoint(source)
    assert [shard_number(f) for f in checkpoint.files] == ["00001", "00002", "00003"]
    target = convert_checkpoint(source, tmp_path / "dst", progress=False)
    converted = load_checkpoint(target)
    for name in weight_map:
        assert shard_number(converted.source(name)) == f"{int(converted[name][0]):05d}"


def test_convert_releases_mapped_pages(tmp_path):
    """After a tensor is written its mapped pages are dropped (bounded RSS when converting)."""
    import mmap

    from glm_numpy.checkpoint.writing import release_pages

    source = write_tiny_checkpoint(tmp_path / "src", fmt="bin")
    array = load_checkpoint(source)["transformer.output_layer.weight"]
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    assert isinstance(base, mmap.mmap)  # the views do lead back to the file's map
    release_pages(array)
    assert np.isfinite(array).all()  # still readable afterwards
