"""16-bit storage: how checkpoint tensors are held and widened.

Weights stay in the dtype they are stored in (memory-mapped, 12.5 GB for the 6B model) and are
widened to float32 only where they are used. numpy has float16 but no bfloat16, so a bfloat16
tensor is held as its raw bit pattern in a ``uint16`` array: in a checkpoint mapping, **uint16
means bfloat16** (no supported checkpoint stores real uint16 tensors).
"""

from __future__ import annotations

import numpy as np

BFLOAT16 = np.dtype(np.uint16)  # the bit patterns of bfloat16 values

# The floating storage dtypes a weight may have, by their checkpoint names.
FLOAT_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16,
}


def dtype_name(dtype: np.dtype) -> str:
    """The checkpoint name of a storage dtype: 'bfloat16' for uint16 bits, else numpy's name."""
    return "bfloat16" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).name


def to_float32(array: np.ndarray) -> np.ndarray:
    """Widen float32 / float16 / bfloat16-as-uint16 storage to float32 (exact for all three)."""
    if array.dtype == BFLOAT16:
        # bfloat16 is the top half of a float32: shift the bits back into place.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def float32_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (round to nearest even; NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


def from_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Store float32 values as 'float32', 'float16' or 'bfloat16' (bits in uint16)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16(array)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(FLOAT_DTYPES)}")
    return np.asarray(array, dtype=FLOAT_DTYPES[dtype])
