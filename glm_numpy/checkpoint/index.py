"""Open a checkpoint (a directory, an index json or a single file) as one name -> array mapping.

The official checkpoint is 7 ``pytorch_model-0000k-of-00007.bin`` shards plus
``pytorch_model.bin.index.json``, whose ``weight_map`` says which shard holds each tensor;
layers are split across shards, so we follow the map tensor by tensor. ``convert`` writes the
same layout as ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``.

Every array is a read-only view on a memory map of its shard: opening costs almost no RAM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError
from glm_numpy.checkpoint.safetensors_io import read_safetensors
from glm_numpy.checkpoint.torch_zip import read_torch_file
from glm_numpy.progress import progress_bar

# What a directory may contain, in the order we look for it.
ENTRY_FILES = (
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "pytorch_model.bin",
)


class Checkpoint(Mapping):
    """Read-only mapping: official tensor name -> np.ndarray (memory-mapped, never copied).

    dtypes: float32, float16, uint16 (= bfloat16 bits), int8, uint8, int32, int64, bool.
    """

    def __init__(
        self,
        path: Path,
        tensors: dict[str, np.ndarray],
        sources: dict[str, Path],
        index_metadata: dict | None = None,
    ):
        self.path = path
        self._tensors = tensors
        self._sources = sources
        self.index_metadata = index_metadata or {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {len(self.files)} files)"

    def source(self, name: str) -> str:
        """The file tensor ``name`` was read from (for error messages)."""
        return str(self._sources[name])

    @property
    def files(self) -> list[str]:
        """The shard files, in index order."""
        return list(dict.fromkeys(str(p) for p in self._sources.values()))

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self._tensors.values())


def load_checkpoint(path: str | Path, progress: bool = False) -> Checkpoint:
    """Open a checkpoint directory, index json, .safetensors or torch .bin file.

    Tensors are memory-mapped, not read: opening takes well under a second from a local disk.
    progress=True shows the bytes mapped on stderr should it take longer (glm_numpy.progress).
    """
    path = Path(path)
    if path.is_dir():
        path = _entry_file(path)
    elif not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.name.endswith(".index.json"):
        return _load_sharded(path, progress)
    tensors = read_tensor_file(path)
    return Checkpoint(path, tensors, dict.fromkeys(tensors, path))


def read_tensor_file(path: Path) -> dict[str, np.ndarray]:
    """One shard: .safetensors by its name, anything else must be a torch zip file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path)


def _entry_file(directory: Path) -> Path:
    for name in ENTRY_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory}: no checkpoint found (expected one of {', '.join(ENTRY_FILES)})"
    )


def _load_sharded(index_path: Path, progress: bool = False) -> Checkpoint:
    weight_map, metadata = _read_index(index_path)
    tensors: dict[str, np.ndarray] = {}
    sources: dict[str, Path] = {}
    # Shard files in their own order (00001, 00002, ...), not in the index's name order.
    shards = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            listed = next(name for name, file in weight_map.items() if file == shard.name)
            raise CheckpointError(
                f"{index_path}: shard {shard.name!r} (holding e.g. {listed!r}) does not exist"
            )
    total = sum(shard.stat().st_size for shard in shards)
    with progress_bar(total, "loading", "B", enabled=progress) as bar:
        for shard in shards:
            for name, array in read_tensor_file(shard).items():
                if name in sources:
                    raise CheckpointError(
                        f"tensor {name!r} is duplicated: found in {sources[name]} and in {shard}"
                    )
                tensors[name], sources[name] = array, shard
            bar.update(shard.stat().st_size)
    for name, shard_name in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {shard_name!r}, "
                f"but {index_path.parent / shard_name} does not contain it"
            )
        if sources[name].name != Path(shard_name).name:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} is mapped to {shard_name!r} "
                f"but found in {sources[name]}"
            )
    return Checkpoint(index_path, tensors, sources, metadata)


def _read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """The index's weight_map (tensor name -> shard file name) and metadata."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index_path}: cannot read index ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
    for name, shard_name in weight_map.items():
        # Shards live beside the index; a path elsewhere is a corrupt (or hostile) index.
        if Path(shard_name).name != shard_name or shard_name in ("", ".", ".."):
            raise CheckpointError(
                f"{index_path}: tensor {name!r}: shard {shard_name!r} is not a plain file name"
            )
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{index_path}: 'metadata' must be an object")
    return weight_map, metadata
