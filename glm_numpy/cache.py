"""The KV cache: what every layer has already computed for the tokens seen so far (spec §4.1).

For one sequence and each layer i:
    keys[i]   [S, G, Dh] — stored AFTER rotary (so a cached key never needs re-rotating)
                           and BEFORE the expansion of G groups to H heads (H/G x smaller)
    values[i] [S, G, Dh]
    is_token  [S] bool — False where a slot holds left padding, which no query may attend to
A new token at slot S gets position ``next_position`` (padding does not advance positions).

Storage: float32 by default; ``dtype="float16"`` or ``"bfloat16"`` (held as uint16 bits, see
glm_numpy.dtypes) halves the memory, and the attention kernel widens each block it reads back
to float32 (the effect on logits is measured in docs/numerics.md). Each layer's keys are held
group-major, [G, capacity, Dh], so that one group's keys are one contiguous matrix for the
kernel's matrix products; ``keys(i)`` is a [S, G, Dh] view of them.
"""

from __future__ import annotations

import numpy as np

from glm_numpy.dtypes import FLOAT_DTYPES, from_float32, to_float32


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_groups: int,
        head_dim: int,
        capacity: int = 256,
        dtype: str = "float32",
        max_tokens: int | None = None,
    ):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"KV cache dtype={dtype!r}: expected one of {sorted(FLOAT_DTYPES)}")
        self.dtype_name, self.dtype = dtype, FLOAT_DTYPES[dtype]
        self._groups, self._head_dim = num_kv_groups, head_dim
        self._num_layers = num_layers
        self.max_tokens = max_tokens  # the model's seq_length: growth never goes past it
        self._keys, self._values = self._allocate(capacity)
        self._is_token = np.zeros(capacity, dtype=bool)
        self.length = 0  # S: slots filled
        self.next_position = 0  # the position id the next real token gets

    def _allocate(self, capacity: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Keys and values of every layer, [G, capacity, Dh] each; a clear error if they do not
        fit in memory."""
        shape = (self._groups, capacity, self._head_dim)
        try:
            keys = [np.zeros(shape, self.dtype) for _ in range(self._num_layers)]
            values = [np.zeros(shape, self.dtype) for _ in range(self._num_layers)]
        except MemoryError:
            raise MemoryError(
                f"cannot allocate a KV cache of {self.bytes_for(capacity):,} bytes "
                f"({capacity} tokens x {self._num_layers} layers x K and V x {self._groups} "
                f"groups x {self._head_dim} x {self.dtype.itemsize} bytes, "
                f"{self.dtype_name})"
            ) from None
        return keys, values

    def bytes_for(self, tokens: int) -> int:
        """Bytes of keys and values for `tokens` slots: 2 * L * tokens * G * Dh * itemsize."""
        return 2 * self._num_layers * tokens * self._groups * self._head_dim * self.dtype.itemsize

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def is_token(self) -> np.ndarray:
        """[S] bool: which filled slots hold real tokens (not left padding)."""
        return self._is_token[: self.length]

    def stored_keys(self, layer: int) -> np.ndarray:
        """[S, G, Dh] in the storage dtype (a view): what the attention kernel reads."""
        return self._keys[layer][:, : self.length].transpose(1, 0, 2)

    def stored_values(self, layer: int) -> np.ndarray:
        """[S, G, Dh] in the storage dtype (a view)."""
        return self._values[layer][:, : self.length].transpose(1, 0, 2)

    def keys(self, layer: int) -> np.ndarray:
        """[S, G, Dh] float32 (a view of a float32 cache, a widened copy of a 16-bit one)."""
        return to_float32(self.stored_keys(layer))

    def values(self, layer: int) -> np.ndarray:
        """[S, G, Dh] float32"""
        return to_float32(self.stored_values(layer))

    def positions_for(self, is_token: np.ndarray) -> np.ndarray:
        """is_token [T] bool -> position ids [T] for new slots: real tokens continue from the
        cache's last position, padding gets position 0 (spec §5.4)."""
        counted = self.next_position + np.cumsum(is_token) - 1  # [T]
        return np.where(is_token, counted, 0).astype(np.int64)

    def make_room(self, T: int) -> None:
        """Grow (if needed) to hold T more slots: geometrically, so appends stay amortised O(1),
        but never past max_tokens. Called for a whole prompt before a chunked prefill, so that
        the cache does not double its way there (each doubling holds old and new arrays)."""
        needed, capacity = self.length + T, len(self._is_token)
        if needed <= capacity:
            return
        doubled = 2 * capacity if self.max_tokens is None else min(2 * capacity, self.max_tokens)
        self._grow(max(needed, doubled))

    def _grow(self, tokens: int) -> None:
        keys, values = self._allocate(tokens)
        for old, new in zip(self._keys + self._values, keys + values):
            new[:, : self.length] = old[:, : self.length]
        self._keys, self._values = keys, values
        is_token_all = np.zeros(tokens, dtype=bool)
        is_token_all[: self.length] = self._is_token[: self.length]
        self._is_token = is_token_all

    def extend(self, is_token: np.ndarray) -> slice:
        """Reserve T new slots (is_token [T] bool) and return where they are; each layer then
        fills its keys and values there with ``store``."""
        start, end = self.length, self.length + len(is_token)
        self.make_room(len(is_token))
        self._is_token[start:end] = is_token
        self.next_position += int(np.count_nonzero(is_token))
        self.length = end
        return slice(start, end)

    def store(self, layer: int, slots: slice, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v [T, G, Dh] of one layer into the reserved slots (rounded to the storage
        dtype; bfloat16 by round-to-nearest-even, as torch does)."""
        self._keys[layer][:, slots] = from_float32(k, self.dtype_name).transpose(1, 0, 2)
        self._values[layer][:, slots] = from_float32(v, self.dtype_name).transpose(1, 0, 2)

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part: 2 (K and V) * L * S * G * Dh * itemsize."""
        return self.bytes_for(self.length)
