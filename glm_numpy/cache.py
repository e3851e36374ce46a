"""The KV cache: what every layer has already computed for the tokens seen so far (spec §4.1).

For one sequence and each layer i:
    keys[i]   [S, G, Dh] float32 — stored AFTER rotary (so a cached key never needs re-rotating)
                                   and BEFORE the expansion of G groups to H heads (H/G x smaller)
    values[i] [S, G, Dh] float32
    is_token  [S] bool — False where a slot holds left padding, which no query may attend to
A new token at slot S gets position ``next_position`` (padding does not advance positions).
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, num_kv_groups: int, head_dim: int, capacity: int = 256):
        self._shape = (num_kv_groups, head_dim)
        self._keys = [self._empty(capacity) for _ in range(num_layers)]
        self._values = [self._empty(capacity) for _ in range(num_layers)]
        self._is_token = np.zeros(capacity, dtype=bool)
        self.length = 0  # S: slots filled
        self.next_position = 0  # the position id the next real token gets

    def _empty(self, capacity: int) -> np.ndarray:
        return np.empty((capacity, *self._shape), dtype=np.float32)

    @property
    def num_layers(self) -> int:
        return len(self._keys)

    @property
    def is_token(self) -> np.ndarray:
        """[S] bool: which filled slots hold real tokens (not left padding)."""
        return self._is_token[: self.length]

    def keys(self, layer: int) -> np.ndarray:
        """[S, G, Dh]"""
        return self._keys[layer][: self.length]

    def values(self, layer: int) -> np.ndarray:
        """[S, G, Dh]"""
        return self._values[layer][: self.length]

    def positions_for(self, is_token: np.ndarray) -> np.ndarray:
        """is_token [T] bool -> position ids [T] for new slots: real tokens continue from the
        cache's last position, padding gets position 0 (spec §5.4)."""
        counted = self.next_position + np.cumsum(is_token) - 1  # [T]
        return np.where(is_token, counted, 0).astype(np.int64)

    def extend(self, is_token: np.ndarray) -> slice:
        """Reserve T new slots (is_token [T] bool) and return where they are; each layer then
        fills its keys and values there with ``store``."""
        start, end = self.length, self.length + len(is_token)
        if end > len(self._is_token):  # grow geometrically: appends stay amortised O(1)
            capacity = max(end, 2 * len(self._is_token))
            self._keys = [self._grown(a, capacity) for a in self._keys]
            self._values = [self._grown(a, capacity) for a in self._values]
            is_token_all = np.zeros(capacity, dtype=bool)
            is_token_all[:start] = self._is_token[:start]
            self._is_token = is_token_all
        self._is_token[start:end] = is_token
        self.next_position += int(np.count_nonzero(is_token))
        self.length = end
        return slice(start, end)

    def _grown(self, array: np.ndarray, capacity: int) -> np.ndarray:
        grown = self._empty(capacity)
        grown[: self.length] = array[: self.length]
        return grown

    def store(self, layer: int, slots: slice, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v [T, G, Dh] of one layer into the reserved slots."""
        self._keys[layer][slots] = k
        self._values[layer][slots] = v

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part: 2 (K and V) * L * S * G * Dh * 4."""
        return 2 * self.num_layers * self.length * int(np.prod(self._shape)) * 4
