"""The two checkpoint commands: ``convert`` and ``make-random-checkpoint``.

Both write under a temporary name beside DST and rename at the very end, so a failure (or
Ctrl-C) never leaves a half-written DST behind, and both refuse a DST that already exists
(glm_numpy.checkpoint.writing).
Tensors are handled one at a time, so peak memory stays at a few tensors whatever the model size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError
from glm_numpy.checkpoint.index import ENTRY_FILES, Checkpoint, load_checkpoint
from glm_numpy.checkpoint.safetensors_io import write_safetensors_stream
from glm_numpy.checkpoint.synthetic import (
    OFFICIAL_MAX_SHARD_BYTES,
    random_config,
    shard_file_name,
    write_index,
    write_random_checkpoint,
)
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.checkpoint.writing import (
    refuse_existing,
    release_pages,
    temporary_directory,
)
from glm_numpy.config import ChatGLM2Config, ConfigError
from glm_numpy.dtypes import FLOAT_DTYPES, from_float32, to_float32
from glm_numpy.progress import progress_bar

CONVERT_CHUNK_ELEMENTS = 1 << 22  # convert dtypes 4M values at a time


# --- convert -------------------------------------------------------------------------------


def convert_checkpoint(
    src: str | Path, dst: str | Path, dtype: str | None = None, progress: bool = True
) -> Path:
    """Rewrite a checkpoint as safetensors shards + model.safetensors.index.json in ``dst``.

    Official tensor names and shard split are kept (output shard k holds source shard k's
    tensors); float weights are cast to ``dtype`` if given ('float32', 'float16', 'bfloat16');
    int8 quantised weights and their scales are copied unchanged. The other files of a source
    directory (config.json, tokenizer files) are copied, with torch_dtype updated.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(FLOAT_DTYPES)}")
    refuse_existing(dst)
    checkpoint = load_checkpoint(src)
    config_values = _source_config(src)
    if config_values is not None:
        validate_checkpoint(checkpoint, _parse_config(config_values, src))
    with temporary_directory(dst) as work:
        _write_converted_shards(checkpoint, work, dtype, progress)
        if src.is_dir():
            copy_side_files(src, work)
        if config_values is not None:
            if dtype is not None:
                config_values["torch_dtype"] = dtype
            text = json.dumps(config_values, indent=2, ensure_ascii=False) + "\n"
            (work / "config.json").write_text(text, encoding="utf-8")
    return dst


def _write_converted_shards(
    checkpoint: Checkpoint, directory: Path, dtype: str | None, progress: bool
) -> None:
    groups = source_shards(checkpoint)
    total = sum(_converted_nbytes(checkpoint[name], name, dtype) for g in groups for name in g)
    weight_map: dict[str, str] = {}
    with progress_bar(total, "convert", "B", enabled=progress) as bar:
        for k, names in enumerate(groups, start=1):
            file_name = shard_file_name("safetensors", k, len(groups))
            entries = [_converted_entry(name, checkpoint[name], dtype) for name in names]
            arrays = _converted_arrays(checkpoint, names, dtype, bar)
            write_safetensors_stream(directory / file_name, entries, arrays, {"format": "pt"})
            weight_map.update(dict.fromkeys(names, file_name))
    write_index(directory, "safetensors", weight_map, total)


def source_shards(checkpoint: Checkpoint) -> list[list[str]]:
    """Tensor names grouped by the file they came from, in file order (the official split)."""
    groups: dict[str, list[str]] = {}
    for name in checkpoint:
        groups.setdefault(checkpoint.source(name), []).append(name)
    return list(groups.values())


def _is_float_weight(name: str, array: np.ndarray) -> bool:
    """Float tensors follow --dtype; the fp16 scales of quantised weights stay as published."""
    return array.dtype in FLOAT_DTYPES.values() and not name.endswith(".weight_scale")


def _converted_entry(name: str, array: np.ndarray, dtype: str | None):
    if dtype is not None and _is_float_weight(name, array):
        return name, FLOAT_DTYPES[dtype], array.shape
    return name, array.dtype, array.shape


def _converted_nbytes(array: np.ndarray, name: str, dtype: str | None) -> int:
    _, new_dtype, _ = _converted_entry(name, array, dtype)
    return array.size * np.dtype(new_dtype).itemsize


def _converted_arrays(
    checkpoint: Checkpoint, names: list[str], dtype: str | None, bar
) -> Iterator[np.ndarray]:
    for name in names:
        array = checkpoint[name]
        if dtype is not None and _is_float_weight(name, array):
            if array.dtype != FLOAT_DTYPES[dtype]:
                array = cast_in_chunks(array, dtype)
        yield array
        bar.update(_converted_nbytes(checkpoint[name], name, dtype))
        release_pages(checkpoint[name])


def cast_in_chunks(array: np.ndarray, dtype: str) -> np.ndarray:
    """array (float32/float16/bfloat16 bits) stored as ``dtype``, without a float32 copy of it
    all: only the output and one chunk of rows exist at a time."""
    out = np.empty(array.shape, FLOAT_DTYPES[dtype])
    source = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    target = out.reshape(source.shape)
    step = max(1, CONVERT_CHUNK_ELEMENTS // max(1, source.shape[1]))
    for start in range(0, source.shape[0], step):
        rows = slice(start, start + step)
        target[rows] = from_float32(to_float32(source[rows]), dtype)
    return out


def _source_config(src: Path) -> dict | None:
    """The source's config.json as a dict (beside the file when src is a file), if any."""
    path = (src if src.is_dir() else src.parent) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read config ({err})") from None


def _parse_config(values: dict, src: Path) -> ChatGLM2Config:
    try:
        return ChatGLM2Config.from_dict(values, source=str(src / "config.json"))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files and the like; not the shards, their index, or config.json."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name == "config.json" or path.name in ENTRY_FILES:
            continue
        if path.suffix in (".bin", ".safetensors", ".pt", ".pth") or path.name.startswith("."):
            continue
        if path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, dst / path.name)


# --- make-random-checkpoint ---------------------------------------------------------------


def make_random_checkpoint(
    dst: str | Path,
    size: str = "6b",
    fmt: str = "bin",
    dtype: str = "float16",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """A random checkpoint with the official names, shapes, shard split and index.

    size "6b": the real 7 shards (12,487,168,064 bytes of tensors), written tensor by tensor;
    size "tiny": two shards with one layer split across them. ``fmt`` "bin" writes torch zip
    files with our own writer (torch is not needed), "safetensors" safetensors shards.
    """
    dst = Path(dst)
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt={fmt!r}: expected 'bin' or 'safetensors'")
    refuse_existing(dst)
    config_values = random_config(size, dtype)
    plan = "official" if size == "6b" else "split-middle-layer"
    total = _total_bytes(config_values, dtype)
    with temporary_directory(dst) as work, progress_bar(total, size, "B", enabled=progress) as bar:
        write_random_checkpoint(
            work, config_values, fmt=fmt, seed=seed, shard_plan=plan, progress=bar.update
        )
    return dst


def _total_bytes(config_values: dict, dtype: str) -> int:
    from glm_numpy.checkpoint.layout import official_tensors
    from glm_numpy.checkpoint.synthetic import tensor_nbytes

    config = ChatGLM2Config.from_dict(config_values)
    return sum(tensor_nbytes(spec, dtype) for spec in official_tensors(config))


__all__ = ["OFFICIAL_MAX_SHARD_BYTES", "convert_checkpoint", "make_random_checkpoint"]
