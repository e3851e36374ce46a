"""Read and write .safetensors files with numpy alone.

The format is simple enough to read by hand, which is why we do (the ``safetensors`` package's
numpy API cannot return bfloat16):

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  a JSON object: name -> {"dtype": "F16", "shape": [O, I], "data_offsets": [b, e]},
               plus an optional "__metadata__": {str: str}
    [rest]     the data section; tensor bytes are data[b:e], little-endian, C order

Reading memory-maps the data section once and hands out read-only views into it, so opening a
12 GB checkpoint costs no RAM until a tensor's pages are touched. bfloat16 comes back as the raw
bit patterns in a uint16 array (see glm_numpy.dtypes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError

# safetensors dtype code <-> numpy storage dtype (uint16 holds bfloat16 bits).
DTYPE_BY_CODE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
CODE_BY_DTYPE = {dtype.newbyteorder("="): code for code, dtype in DTYPE_BY_CODE.items()}

MAX_HEADER_BYTES = 100_000_000  # the limit the reference implementation uses
HEADER_ALIGNMENT = 8  # the header is padded with spaces so the data section starts aligned


def read_safetensors_header(path: str | Path) -> tuple[dict, dict[str, str], int]:
    """Parse a file's header: (tensor entries by name, metadata, byte offset of the data)."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(
                    f"{path}: corrupt safetensors file (header length {header_size} "
                    f"does not fit in a {file_size}-byte file)"
                )
            header_bytes = f.read(header_size)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    return header, metadata, 8 + header_size


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as read-only views on one memory map (zero copy)."""
    path = Path(path)
    header, _, data_start = read_safetensors_header(path)
    data_size = path.stat().st_size - data_start
    entries = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, entries)
    data = _map_data_section(path, data_start, data_size)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors


def _parse_entry(path: Path, name: str, entry: object, data_size: int):
    """Check one header entry; returns (dtype, shape, begin, end)."""

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise fail("header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPE_BY_CODE:
        raise fail(f"unsupported dtype {code!r} (expected one of {sorted(DTYPE_BY_CODE)})")
    if not _is_int_list(shape) or any(n < 0 for n in shape):
        raise fail(f"bad shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise fail(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise fail(
            f"data_offsets {offsets} lie outside the {data_size}-byte data section "
            "(truncated file?)"
        )
    dtype = DTYPE_BY_CODE[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise fail(f"{end - begin} bytes cannot hold a {code} tensor of shape {shape}")
    return dtype.newbyteorder("="), tuple(shape), begin, end


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in value
    )


def _check_no_overlap(path: Path, entries: dict) -> None:
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    for (_, end, name), (begin, _, next_name) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {name!r} and {next_name!r} overlap")


def _map_data_section(path: Path, start: int, size: int) -> np.ndarray:
    """The data section as a read-only uint8 array backed by the file (np.memmap)."""
    if size == 0:  # mmap cannot map zero bytes
        empty = np.empty(0, np.uint8)
        empty.flags.writeable = False
        return empty
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot memory-map ({err})") from None
    return np.asarray(mapped)  # a plain ndarray view; keeps the map alive through .base


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors to a .safetensors file; uint16 arrays are written as BF16.

    The file appears under ``path`` only once complete (written to a temporary name, then
    renamed). A memory-mapped input is streamed, never copied whole.
    """
    entries = [(name, np.asarray(array).dtype, np.shape(array)) for name, array in tensors.items()]
    write_safetensors_stream(path, entries, tensors.values(), metadata)


def write_safetensors_stream(
    path: str | Path,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors that arrive one at a time: ``entries`` (name, dtype, shape) describe them
    up front (the header comes first), ``arrays`` yields them in the same order. Only one
    tensor needs to exist at a time, which keeps converting a 12 GB model in bounded memory.
    """
    path = Path(path)
    header_bytes = _header_bytes(entries, metadata)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            arrays = iter(arrays)
            for name, dtype, shape in entries:
                array = as_announced(name, dtype, shape, next(arrays, None))
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def as_announced(name: str, dtype: np.dtype, shape: tuple, array: np.ndarray | None) -> np.ndarray:
    """The array announced in a header as (name, dtype, shape), in little-endian byte order
    (both safetensors and our torch zip files are little-endian)."""
    if array is None or array.dtype != dtype or array.shape != tuple(shape):
        raise CheckpointError(f"tensor {name!r}: does not match its announced {dtype} {shape}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def _header_bytes(entries: list, metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in entries:
        code = CODE_BY_DTYPE.get(np.dtype(dtype).newbyteorder("="))
        if code is None:
            raise CheckpointError(f"tensor {name!r}: cannot store dtype {dtype} in safetensors")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    padding = -(8 + len(text)) % HEADER_ALIGNMENT
    return text + b" " * padding
