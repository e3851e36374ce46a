"""The KV caches of finished conversations, so that the next round does not re-read them.

An OpenAI client sends the whole conversation every round. When its earlier rounds are exactly a
conversation this server just answered, the KV cache of that conversation (every token but the
final </s>, as ``ChatSession`` keeps it, spec §4.5) is taken out of here and only the new round
is fed. Bounded by bytes, least recently used first out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from glm_numpy.cache import KVCache
from glm_numpy.tokenizer import History

Conversation = tuple[tuple[str, str], ...]  # (query, response) per round, as build_prompt takes


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Conversation, KVCache] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(cache.nbytes for cache in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, history: History) -> KVCache | None:
        """The cache holding exactly these rounds, removed from here (a conversation goes on in
        one request at a time; a second request for the same rounds starts afresh)."""
        with self._lock:
            return self._entries.pop(conversation_key(history), None)

    def put(self, history: History, cache: KVCache) -> None:
        """Keep the cache of these rounds; drop the least recently used to stay in budget."""
        if cache.nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries[conversation_key(history)] = cache
            total = sum(c.nbytes for c in self._entries.values())
            while total > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes


def conversation_key(history: History) -> Conversation:
    return tuple((str(query), str(response)) for query, response in history)
