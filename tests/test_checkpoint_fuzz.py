"""Damaged files: mutated or truncated bytes give a CheckpointError or valid arrays — never
another exception type, a crash or a hang."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_safetensors,
    read_torch_file,
    write_safetensors,
)

TENSORS = {
    "a": np.arange(12, dtype=np.float16).reshape(3, 4),
    "b": np.array([0x3F80, 0xC000], np.uint16),
    "c": np.arange(5, dtype=np.int64),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(torch .bin bytes with views and shared storage, safetensors bytes)."""
    directory = tmp_path_factory.mktemp("pristine")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    torch.save(
        {"base": base, "view": base.t()[1:], "i8": torch.ones(3, dtype=torch.int8)},
        directory / "m.bin",
    )
    write_safetensors(directory / "m.safetensors", TENSORS)
    return (directory / "m.bin").read_bytes(), (directory / "m.safetensors").read_bytes()


def load_damaged(path, reader):
    """Read a damaged file: either CheckpointError, or arrays whose every byte can be read."""
    try:
        tensors = reader(path)
    except CheckpointError:
        return
    for array in tensors.values():
        np.ascontiguousarray(array).tobytes()  # touches every element: must stay in bounds


mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


def mutate(data: bytes, changes) -> bytes:
    data = bytearray(data)
    for position, value in changes:
        data[position % len(data)] = value
    return bytes(data)


@given(changes=mutations)
def test_mutated_torch_files(tmp_path_factory, pristine, changes):
    path = tmp_path_factory.mktemp("fuzz") / "m.bin"
    path.write_bytes(mutate(pristine[0], changes))
    load_damaged(path, read_torch_file)
    load_damaged(path, load_checkpoint)


@given(changes=mutations)
def test_mutated_safetensors_files(tmp_path_factory, pristine, changes):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(mutate(pristine[1], changes))
    load_damaged(path, read_safetensors)


@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files(tmp_path_factory, pristine, fraction):
    directory = tmp_path_factory.mktemp("truncated")
    for name, data in zip(["m.bin", "m.safetensors"], pristine):
        path = directory / name
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)


@given(header=st.binary(max_size=64))
def test_random_safetensors_headers(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("header") / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    load_damaged(path, read_safetensors)


@given(pickle_bytes=st.binary(max_size=200))
def test_random_pickles(pickle_bytes):
    from glm_numpy.checkpoint.torch_zip import RestrictedUnpickler

    try:
        RestrictedUnpickler(b"\x80\x02" + pickle_bytes, lambda *args: None).load()
    except CheckpointError:
        pass
