"""``glm-numpy quantize``: write a quantised copy of a checkpoint.

safetensors shards with the official names, ``<module>.weight`` int8 and
``<module>.weight_scale`` float16 ([O] per row, [O, I/group_size] group-wise), and config.json
recording the scheme: ``quantization_bit`` (official) plus, when used, ``quantization_group_size``
and ``quantization_output_layer`` (ours). The embedding and norms stay 16-bit. The math is
glm_numpy.quantize.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.convert import copy_side_files, source_shards
from glm_numpy.checkpoint.index import Checkpoint, load_checkpoint
from glm_numpy.checkpoint.layout import QUANTIZED_MODULES
from glm_numpy.checkpoint.safetensors_io import write_safetensors_stream
from glm_numpy.checkpoint.synthetic import shard_file_name, write_index
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.checkpoint.writing import (
    refuse_existing,
    release_pages,
    temporary_directory,
)
from glm_numpy.config import ChatGLM2Config
from glm_numpy.progress import progress_bar
from glm_numpy.quantize import quantize

OUTPUT_LAYER = "transformer.output_layer.weight"
QUANTIZE_CHUNK_ROWS = 1024  # rows quantised at a time: bounds the float32 temporaries


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    bits: int,
    group_size: int | None = None,
    quantize_output_layer: bool = False,
    progress: bool = True,
) -> Path:
    """Write a quantised copy of the checkpoint directory ``src`` to the new directory ``dst``.

    The four Linear weights of every layer (and the output layer if asked) become int8 weights
    plus float16 scales; everything else is copied as stored. Shard k of the output holds the
    tensors of source shard k. Tensors are handled one at a time, a chunk of rows at a time.
    """
    src, dst = Path(src), Path(dst)
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected 4 or 8")
    refuse_existing(dst)
    config = ChatGLM2Config.from_json(src / "config.json")
    config_values = config.to_dict()
    if config.quantization_bit:
        raise ValueError(f"{src}: already quantised (quantization_bit={config.quantization_bit})")
    checkpoint = load_checkpoint(src)
    validate_checkpoint(checkpoint, config)
    widths = [
        config.hidden_size,
        config.ffn_hidden_size,
        config.num_attention_heads * config.head_dim,
    ]
    if group_size is not None and (group_size <= 0 or any(w % group_size for w in widths)):
        raise ValueError(f"group_size={group_size!r} must divide the input widths {widths}")

    def is_quantized(name: str) -> bool:
        if name == OUTPUT_LAYER:
            return quantize_output_layer
        module = name.removesuffix(".weight")
        return module != name and module.endswith(QUANTIZED_MODULES)

    with temporary_directory(dst) as work:
        weight_map: dict[str, str] = {}
        total = 0
        groups = source_shards(checkpoint)
        with progress_bar(checkpoint.nbytes, "quantize", "B", enabled=progress) as bar:
            for k, names in enumerate(groups, start=1):
                file_name = shard_file_name("safetensors", k, len(groups))
                entries = [
                    e
                    for n in names
                    for e in _entries(n, checkpoint[n], is_quantized(n), bits, group_size)
                ]
                arrays = _arrays(checkpoint, names, is_quantized, bits, group_size, bar)
                write_safetensors_stream(work / file_name, entries, arrays, {"format": "pt"})
                weight_map.update(dict.fromkeys((e[0] for e in entries), file_name))
                total += sum(
                    int(np.prod(shape)) * np.dtype(dtype).itemsize for _, dtype, shape in entries
                )
        write_index(work, "safetensors", weight_map, total)
        copy_side_files(src, work)
        config_values["quantization_bit"] = bits
        if group_size is not None:
            config_values["quantization_group_size"] = group_size
        if quantize_output_layer:
            config_values["quantization_output_layer"] = True
        text = json.dumps(config_values, indent=2, ensure_ascii=False) + "\n"
        (work / "config.json").write_text(text, encoding="utf-8")
    return dst


def _entries(name: str, array: np.ndarray, quantized: bool, bits: int, group_size: int | None):
    """(name, dtype, shape) of what one source tensor becomes: itself, or weight + scale."""
    if not quantized:
        return [(name, array.dtype, array.shape)]
    rows, columns = array.shape
    stored = (rows, columns // 2 if bits == 4 else columns)
    scale = (rows,) if group_size is None else (rows, columns // group_size)
    return [(name, np.dtype(np.int8), stored), (f"{name}_scale", np.dtype(np.float16), scale)]


def _arrays(
    checkpoint: Checkpoint, names: list[str], is_quantized, bits: int, group_size: int | None, bar
) -> Iterator[np.ndarray]:
    """The arrays announced by ``_entries``, in order: a quantised weight yields q then scale."""
    for name in names:
        array = checkpoint[name]
        if is_quantized(name):
            parts = [
                quantize(array[start : start + QUANTIZE_CHUNK_ROWS], bits, group_size)
                for start in range(0, array.shape[0], QUANTIZE_CHUNK_ROWS)
            ]
            yield np.concatenate([p.q for p in parts])
            yield np.concatenate([p.scale for p in parts])
        else:
            yield array
        bar.update(array.nbytes)
        release_pages(array)
