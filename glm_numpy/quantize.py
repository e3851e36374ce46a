"""Weight-only quantisation: the official per-row scheme and a group-wise scheme of our own.

A quantised matrix W [O, I] is held as integers q and float scales with W ≈ q * scale:

- official (spec §6): one scale per output row, ``scale[o] = max|W[o, :]| / (2^(bits-1) - 1)``;
- group-wise: one scale per row and per run of ``group_size`` input columns, which tracks
  outliers inside a row much better at 4 bits.

int8 values are stored one per byte. int4 values are packed two per byte along the input axis as
the official checkpoints do: byte k of a row holds column 2k in its **high** nibble and column
2k+1 in its **low** nibble, both as signed 4-bit numbers (-8..7).

``quantize_checkpoint`` writes a quantised copy of a checkpoint (the ``glm-numpy quantize``
command): safetensors shards with the official names, ``<module>.weight`` int8 and
``<module>.weight_scale`` float16 ([O] per row, [O, I/group_size] group-wise), and config.json
recording the scheme: ``quantization_bit`` (official) plus, when used, ``quantization_group_size``
and ``quantization_output_layer`` (ours). The embedding and norms stay 16-bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glm_numpy.config import ChatGLM2Config
from glm_numpy.dtypes import to_float32

if TYPE_CHECKING:
    from glm_numpy.checkpoint.index import Checkpoint

OUTPUT_LAYER = "transformer.output_layer.weight"
QUANTIZE_CHUNK_ROWS = 1024  # rows quantised at a time: bounds the float32 temporaries


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """W ≈ q * scale for a Linear weight of shape [O, I] (torch convention [out, in]).

    q:      int8 [O, I] (bits=8) or int8 [O, I/2] with two nibbles per byte (bits=4)
    scale:  float16/float32 [O] (per row, group_size=None) or [O, I/group_size] (group-wise)
    """

    q: np.ndarray
    scale: np.ndarray
    bits: int
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, stored_columns = self.q.shape
        return rows, stored_columns * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def integers(self) -> np.ndarray:
        """The quantised values as int8 [O, I], int4 nibbles unpacked (high nibble first)."""
        if self.bits == 8:
            return np.asarray(self.q, dtype=np.int8)
        packed = np.asarray(self.q, dtype=np.int8)
        high = packed >> 4  # arithmetic shift keeps the sign: column 2k
        low = (packed << 4).astype(np.int8) >> 4  # sign-extend the low nibble: column 2k+1
        return np.stack([high, low], axis=-1).reshape(packed.shape[0], -1)

    def dequantize(self) -> np.ndarray:
        """W as float32 [O, I]."""
        values = self.integers().astype(np.float32)  # [O, I]
        scale = to_float32(self.scale)
        if self.group_size is None:
            return values * scale[:, None]
        rows, columns = values.shape
        grouped = values.reshape(rows, columns // self.group_size, self.group_size)
        return (grouped * scale[:, :, None]).reshape(rows, columns)


def quantize(
    weight: np.ndarray, bits: int, group_size: int | None = None, scale_dtype: str = "float16"
) -> QuantizedWeight:
    """Quantise a float weight [O, I] symmetrically (absmax) per row or per group of columns."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected 4 or 8")
    w = to_float32(weight)  # [O, I]
    rows, columns = w.shape
    if bits == 4 and columns % 2:
        raise ValueError(f"int4 needs an even number of input columns, got {columns}")
    if group_size is not None and (group_size <= 0 or columns % group_size):
        raise ValueError(f"group_size={group_size!r} must divide the {columns} input columns")
    groups = w.reshape(rows, -1, group_size or columns)  # [O, I/gs, gs]
    largest = 2 ** (bits - 1) - 1  # 127 or 7
    scale = np.abs(groups).max(axis=-1) / largest  # [O, I/gs]
    scale = scale.astype(np.dtype(scale_dtype)).astype(np.float32)  # round as it will be stored
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    q = np.clip(np.rint(groups / safe), -largest - (bits == 4), largest).astype(np.int8)
    q = q.reshape(rows, columns)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).astype(np.int8)
    scale = scale.astype(np.dtype(scale_dtype))
    return QuantizedWeight(q, scale[:, 0] if group_size is None else scale, bits, group_size)


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
    # The checkpoint package itself uses ``quantize`` (random quantised checkpoints): import late.
    from glm_numpy.checkpoint.convert import (
        copy_side_files,
        progress_bar,
        refuse_existing,
        source_shards,
        temporary_directory,
    )
    from glm_numpy.checkpoint.index import load_checkpoint
    from glm_numpy.checkpoint.layout import QUANTIZED_MODULES
    from glm_numpy.checkpoint.safetensors_io import write_safetensors_stream
    from glm_numpy.checkpoint.synthetic import shard_file_name, write_index
    from glm_numpy.checkpoint.validate import validate_checkpoint

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
        with progress_bar(checkpoint.nbytes, progress, "quantize") as bar:
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
    from glm_numpy.checkpoint.convert import release_pages

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
