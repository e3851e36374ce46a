"""The torch zip reader against real torch.save files, and our writer against real torch.load.

Every tensor must come back bit-exact: dtypes, shared storages, views with offsets and strides.
"""

import collections
import io
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_torch_file,
    write_torch_zip,
)
from glm_numpy.testing import numpy_to_torch, torch_to_numpy

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int32,
    torch.int64,
    torch.bool,
]


def random_tensor(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def assert_same(array: np.ndarray, tensor: torch.Tensor):
    expected = torch_to_numpy(tensor)
    assert array.dtype == expected.dtype
    assert array.shape == expected.shape
    # bit-exact, including NaN payloads and -0.0
    assert np.ascontiguousarray(array).tobytes() == expected.tobytes()


def save_and_read(tmp_path, state):
    path = tmp_path / "model.bin"
    torch.save(state, path)
    return read_torch_file(path)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_storage_dtype_reads_bit_exact(tmp_path, dtype):
    state = {"x": random_tensor((5, 7), dtype), "scalar": random_tensor((), dtype, seed=1)}
    tensors = save_and_read(tmp_path, state)
    for name, tensor in state.items():
        assert_same(tensors[name], tensor)
        assert not tensors[name].flags.writeable


def test_views_offsets_strides_and_shared_storage(tmp_path):
    base = random_tensor((6, 8), torch.float16)
    state = collections.OrderedDict(
        base=base,
        transposed=base.t(),
        rows=base[2:5],  # storage offset 16
        columns=base[:, 1::3],  # offset 1, stride (8, 3)
        element=base[3, 4],  # 0-d view with an offset
        empty=base[6:],  # zero rows at the end of the storage
        bf16=random_tensor((4, 3), torch.bfloat16).t()[1:],
    )
    tensors = save_and_read(tmp_path, state)
    for name, tensor in state.items():
        assert_same(tensors[name], tensor)
    # shared storage: both are views on the same mapped bytes, never copies
    assert np.shares_memory(tensors["base"], tensors["transposed"])
    assert np.shares_memory(tensors["base"], tensors["columns"])


@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
    dtype=st.sampled_from(TORCH_DTYPES),
    permute=st.randoms(use_true_random=False),
    offset=st.integers(0, 4),
)
def test_random_views_read_bit_exact(tmp_path_factory, shape, dtype, permute, offset):
    flat = random_tensor((offset + max(1, int(np.prod(shape))),), dtype)
    tensor = flat[offset:][: int(np.prod(shape))].reshape(shape)
    order = list(range(len(shape)))
    permute.shuffle(order)
    tensor = tensor.permute(order)
    tensors = save_and_read(tmp_path_factory.mktemp("views"), {"t": tensor, "flat": flat})
    assert_same(tensors["t"], tensor)
    assert_same(tensors["flat"], flat)


def test_parameters_and_module_state_dicts(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    tensors = save_and_read(tmp_path, module.state_dict())  # OrderedDict with _metadata (BUILD)
    for name, tensor in module.state_dict().items():
        assert_same(tensors[name], tensor)
    params = {"p": torch.nn.Parameter(torch.randn(2, 2)), "q": torch.randn(3)}
    tensors = save_and_read(tmp_path, params)
    assert_same(tensors["p"], params["p"])


def test_sharded_official_layout_matches_torch(tmp_path):
    from glm_numpy.testing import write_tiny_checkpoint

    directory = write_tiny_checkpoint(tmp_path / "tiny", fmt="bin", dtype="bfloat16")
    checkpoint = load_checkpoint(directory)
    seen = 0
    for shard in sorted(directory.glob("pytorch_model-*.bin")):
        for name, tensor in torch.load(shard, weights_only=True).items():
            assert_same(checkpoint[name], tensor)
            assert checkpoint.source(name) == str(shard)
            seen += 1
    assert seen == len(checkpoint)


@given(
    shapes=st.lists(st.lists(st.integers(0, 6), max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(TORCH_DTYPES),
)
def test_our_writer_is_read_by_torch_load_bit_exact(tmp_path_factory, shapes, dtype):
    state = {f"t{i}": random_tensor(tuple(shape), dtype, i) for i, shape in enumerate(shapes)}
    arrays = {name: torch_to_numpy(tensor) for name, tensor in state.items()}
    path = tmp_path_factory.mktemp("ours") / "pytorch_model.bin"
    write_torch_zip(path, arrays)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch_to_numpy(loaded[name]).tobytes() == arrays[name].tobytes()
    ours = read_torch_file(path)
    for name in state:
        assert ours[name].tobytes() == arrays[name].tobytes()


def test_our_writer_aligns_storage_records(tmp_path):
    path = tmp_path / "aligned.bin"
    write_torch_zip(path, {"a": np.ones(3, np.float16), "b": np.arange(5, dtype=np.int64)})
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename:
                start = (
                    info.header_offset
                    + 30
                    + int.from_bytes(raw[info.header_offset + 26 :][:2], "little")
                )
                start += int.from_bytes(raw[info.header_offset + 28 :][:2], "little")
                assert start % 64 == 0


def test_numpy_to_torch_round_trip_keeps_bfloat16_bits():
    bits = np.array([0x3F80, 0x7FC1, 0x8000, 0x0001], np.uint16)
    tensor = numpy_to_torch(bits)
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(torch_to_numpy(tensor), bits)


def test_legacy_format_is_refused_with_a_resave_hint(tmp_path):
    path = tmp_path / "legacy.bin"
    torch.save({"x": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="_use_new_zipfile_serialization=True") as error:
        read_torch_file(path)
    assert str(path) in str(error.value)


def test_compressed_records_are_refused(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"x": torch.ones(64)}, path)
    recompressed = tmp_path / "recompressed.bin"
    with (
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(recompressed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    with pytest.raises(CheckpointError, match="compressed"):
        read_torch_file(recompressed)


def rewrite_archive(source_path, target_path, change):
    """Copy a zip, passing each record's (name, bytes) through ``change``."""
    with zipfile.ZipFile(source_path) as source, zipfile.ZipFile(target_path, "w") as target:
        for info in source.infolist():
            name, data = change(info.filename, source.read(info))
            target.writestr(name, data)


def test_big_endian_checkpoints_are_converted_to_native(tmp_path):
    values = np.array([[1.5, -2.0], [np.pi, 65504.0]], np.float16)
    path = tmp_path / "little.bin"
    write_torch_zip(path, {"x": values, "i": np.arange(3, dtype=np.int32)})

    def to_big_endian(name, data):
        if name.endswith("/byteorder"):
            return name, b"big"
        if name.endswith("/data/0"):
            return name, np.frombuffer(data, "<f2").astype(">f2").tobytes()
        if name.endswith("/data/1"):
            return name, np.frombuffer(data, "<i4").astype(">i4").tobytes()
        return name, data

    big = tmp_path / "big.bin"
    rewrite_archive(path, big, to_big_endian)
    tensors = read_torch_file(big)
    assert tensors["x"].dtype == np.float16 and tensors["x"].dtype.isnative
    np.testing.assert_array_equal(tensors["x"], values)
    np.testing.assert_array_equal(tensors["i"], [0, 1, 2])


def test_single_file_checkpoint_without_index(tmp_path):
    torch.save({"a": torch.ones(2, dtype=torch.int8)}, tmp_path / "pytorch_model.bin")
    checkpoint = load_checkpoint(tmp_path)
    assert list(checkpoint) == ["a"]
    assert checkpoint.source("a") == str(tmp_path / "pytorch_model.bin")


def test_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.bin"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="state dict"):
        read_torch_file(path)
    torch.save({"n": 3}, path)
    with pytest.raises(CheckpointError, match="'n' is a int"):
        read_torch_file(path)


def test_mapping_is_read_only(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    checkpoint = load_checkpoint(tmp_path)
    with pytest.raises(TypeError):
        checkpoint["a"] = np.zeros(2)
    with pytest.raises(ValueError):
        checkpoint["a"][0] = 5


def test_buffer_round_trip_via_bytesio_prefix():
    # torch.save to a buffer names its records "archive/..."; the prefix must not matter.
    buffer = io.BytesIO()
    torch.save({"a": torch.arange(4)}, buffer)
    assert b"archive/data.pkl" in buffer.getvalue()
