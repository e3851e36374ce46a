"""Token embedding: a row lookup. ChatGLM2 adds no position embedding and no scaling (spec §3.1)."""

from __future__ import annotations

import numpy as np

from glm_numpy.dtypes import to_float32


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """ids [T] int, table [V, D] (any float storage) -> [T, D] float32.

    Only the T rows asked for are read (and widened), so a memory-mapped table stays on disk.
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    vocab = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise IndexError(f"token id {bad} is outside the embedding table's {vocab} rows")
    return to_float32(table[ids])  # [T, D]
