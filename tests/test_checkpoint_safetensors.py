"""Our safetensors reader/writer against the safetensors package, in both directions."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import save_file as numpy_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from glm_numpy.checkpoint import CheckpointError, read_safetensors, write_safetensors
from glm_numpy.checkpoint.safetensors_io import read_safetensors_header, write_safetensors_stream
from glm_numpy.testing import numpy_to_torch, torch_to_numpy

DTYPES = [np.float32, np.float16, np.uint16, np.int8, np.uint8, np.int32, np.int64, np.bool_]


def random_array(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if dtype == np.bool_:
        return (raw % 2).astype(bool).reshape(shape)
    return raw.view(dtype).reshape(shape)  # any bit pattern, NaNs included


arrays = st.lists(
    st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(DTYPES)),
    min_size=1,
    max_size=5,
)


@given(specs=arrays, seed=st.integers(0, 2**16))
def test_ours_to_safetensors_package(tmp_path_factory, specs, seed):
    tensors = {
        f"t{i}": random_array(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(specs)
    }
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    loaded = torch_load_file(path)  # uint16 must arrive as torch.bfloat16
    for name, array in tensors.items():
        if array.dtype == np.uint16:
            assert loaded[name].dtype == torch.bfloat16
        assert torch_to_numpy(loaded[name]).tobytes() == array.tobytes()
        assert loaded[name].shape == array.shape


@given(specs=arrays, seed=st.integers(0, 2**16))
def test_safetensors_package_to_ours(tmp_path_factory, specs, seed):
    tensors = {
        f"t{i}": random_array(shape, dtype, seed + i) for i, (shape, dtype) in enumerate(specs)
    }
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    torch_save_file({name: numpy_to_torch(a) for name, a in tensors.items()}, path)
    ours = read_safetensors(path)
    for name, array in tensors.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        assert ours[name].tobytes() == array.tobytes()
        assert not ours[name].flags.writeable


def test_numpy_api_files_and_metadata(tmp_path):
    path = tmp_path / "n.safetensors"
    numpy_save_file({"x": np.ones((2, 3), np.float32)}, path, metadata={"format": "np"})
    assert read_safetensors(path)["x"].sum() == 6
    write_safetensors(path, {"y": np.zeros(1, np.int8)}, metadata={"who": "us"})
    _, metadata, data_start = read_safetensors_header(path)
    assert metadata == {"who": "us"} and data_start % 8 == 0


def test_reads_are_zero_copy_views_of_one_map(tmp_path):
    path = tmp_path / "v.safetensors"
    write_safetensors(path, {"a": np.ones(4, np.float16), "b": np.ones(4, np.float16)})
    tensors = read_safetensors(path)
    assert isinstance(tensors["a"].base, np.ndarray) or tensors["a"].base is not None
    assert not tensors["a"].flags.owndata


def test_big_endian_input_is_written_little_endian(tmp_path):
    path = tmp_path / "be.safetensors"
    write_safetensors(path, {"x": np.array([1.0, -2.5], ">f4")})
    np.testing.assert_array_equal(read_safetensors(path)["x"], [1.0, -2.5])


def test_write_is_atomic(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="'bad'"):
        write_safetensors(path, {"ok": np.ones(2, np.float32), "bad": np.ones(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []

    def failing_midway():
        yield np.ones(2, np.float32)
        raise KeyboardInterrupt

    entries = [("a", np.dtype(np.float32), (2,)), ("b", np.dtype(np.float32), (2,))]
    with pytest.raises(KeyboardInterrupt):
        write_safetensors_stream(path, entries, failing_midway())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "cannot hold"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}, "outside"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
        ({"dtype": "F32", "shape": [2]}, "bad data_offsets"),
    ],
)
def test_bad_headers_name_file_and_tensor(tmp_path, entry, message):
    import json

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=message) as error:
        read_safetensors(path)
    assert str(path) in str(error.value) and "'w'" in str(error.value)
