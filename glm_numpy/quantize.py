"""Weight-only quantisation: the official per-row scheme and a group-wise scheme of our own.

A quantised matrix W [O, I] is held as integers q and float scales with W ≈ q * scale:

- official (spec §6): one scale per output row, ``scale[o] = max|W[o, :]| / (2^(bits-1) - 1)``;
- group-wise: one scale per row and per run of ``group_size`` input columns, which tracks
  outliers inside a row much better at 4 bits.

int8 values are stored one per byte. int4 values are packed two per byte along the input axis as
the official checkpoints do: byte k of a row holds column 2k in its **high** nibble and column
2k+1 in its **low** nibble, both as signed 4-bit numbers (-8..7).

This module is the math only, a leaf the layers and kernels import; the command that writes a
quantised copy of a checkpoint is glm_numpy.checkpoint.quantize.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_numpy.dtypes import to_float32


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
