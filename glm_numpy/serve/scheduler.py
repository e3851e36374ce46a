"""Continuous batching: one thread owns the model and moves every active request forward together.

Requests (``Job``) wait in a bounded queue; the scheduler thread loops:

    1. forget requests whose client went away; admit waiting ones while fewer than max_batch run
    2. feed the next chunk (<= prefill_chunk ids) of the oldest prompt still being read
    3. one decode step for every request that is generating: their last tokens go through
       ``forward_batch`` as one [B, 1] batch, so each weight is read once per step for all B rows

so a new prompt is read in chunks between decode steps and the running streams keep flowing. A
request leaves the batch (and its KV cache is freed, or kept in the prompt cache for the next
round of its conversation) the moment it ends: </s>, a stop string, its token budget, or its
client gone. Each row has its own KV cache, sampler and random generator, and rows never mix in
the forward pass, so a request's greedy output does not depend on what runs beside it.

Events go back to the request's ``on_event`` callback (the web layer hands them to its event
loop); the callback must not block.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from glm_numpy.cache import KVCache
from glm_numpy.generation import GenerationConfig, chat_input_ids, new_token_budget, next_token
from glm_numpy.model import ChatGLM2
from glm_numpy.serve.prompt_cache import PromptCache
from glm_numpy.serve.text import TextStream
from glm_numpy.tokenizer import ChatGLM2Tokenizer

log = logging.getLogger("glm_numpy.serve")
# A prompt at least this long logs its prefill's progress after each chunk (tokens done / total,
# tok/s, time left): the server's own view of what glm-numpy generate shows as a progress bar.
LONG_PROMPT_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """One generated token; with logprobs asked for, its log-probability under the model (the
    raw distribution, before temperature and top-p) and the likeliest ids with theirs."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the whole context before the reply, cached part included
    completion_tokens: int  # ids generated (the final </s> is not counted)
    cached_tokens: int  # the part of the prompt taken from the prompt cache


@dataclasses.dataclass(frozen=True)
class Event:
    """What a step produced for one request: text now safe to send and the tokens behind it;
    the last event of a request has a finish_reason ("stop" or "length") and usage, or an
    error."""

    text: str = ""
    tokens: tuple[TokenInfo, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    """A chat request's conversation: the earlier rounds and the new query."""

    history: tuple[tuple[str, str], ...]
    query: str


class QueueFull(Exception):
    """max_queue requests are already waiting."""


class ShuttingDown(Exception):
    """The scheduler has stopped taking requests."""


class Job:
    """One request: its prompt and settings, and (owned by the scheduler thread) its progress."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        on_event: Callable[[Event], None],
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        chat=None,  # ChatTurn (ChatGLM2), serve.chatglm3.Conversation3, or None (completion)
    ):
        self.prompt_ids, self.config, self.on_event = list(prompt_ids), config, on_event
        self.stop, self.logprobs, self.chat = tuple(stop), logprobs, chat
        self.cancelled = threading.Event()
        # progress, touched by the scheduler thread only
        self.cache: KVCache | None = None
        self.pending: list[int] = []  # prompt ids not fed yet
        self.prefill_total, self.prefill_started = 0, 0.0  # ids to feed, when feeding began
        self.seen: list[int] = []  # prompt and output ids (repetition penalty)
        self.next_input = -1  # the id the next decode step feeds
        self.generated = 0
        self.budget = 0
        self.prompt_tokens = self.cached_tokens = 0
        self.unsent: list[TokenInfo] = []
        self.text: TextStream | None = None
        self.rng: np.random.Generator | None = None
        self.closing = False  # finished; one more step feeds its last token for the prompt cache

    def cancel(self) -> None:
        """The client went away: the request leaves the batch at the next step."""
        self.cancelled.set()


class Scheduler:
    def __init__(
        self,
        model: ChatGLM2,
        tokenizer: ChatGLM2Tokenizer,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 128,
        prompt_cache_bytes: int = 1 << 30,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("need max_batch >= 1, max_queue >= 0 and prefill_chunk >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._wake = threading.Condition(threading.RLock())
        self._stopping = False
        self.counts = collections.Counter()  # requests finished / cancelled / failed, for /health
        self._thread = threading.Thread(target=self._run, name="glm-numpy-scheduler", daemon=True)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Take no more requests; end the running ones with an error after the current step.
        Safe in a signal handler (the condition's lock is re-entrant)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """close(), and wait for the scheduler thread to end."""
        self.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue a request (raises QueueFull or ShuttingDown)."""
        with self._wake:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            free_slots = max(0, self.max_batch - len(self._active))
            if len(self._waiting) >= free_slots + self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (--max-queue)")
            self._waiting.append(job)
            self._wake.notify()

    # ------------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active):
                    self._wake.wait()
                if self._stopping:
                    break
                waiting = [j for j in self._waiting if not j.cancelled.is_set()]
                self.counts["cancelled"] += len(self._waiting) - len(waiting)
                self._waiting = collections.deque(waiting)
                while self._waiting and len(self._active) < self.max_batch:
                    job = self._waiting.popleft()
                    self._guarded([job], self._admit)
            for job in [j for j in self._active if j.cancelled.is_set() and not j.closing]:
                self.counts["cancelled"] += 1
                self._leave(job, keep_cache=False)
            self._step()
        for job in [*self._active, *self._waiting]:
            job.on_event(Event(error="the server is shutting down"))
        self._active, self._waiting = [], collections.deque()

    def _admit(self, jobs: list[Job]) -> None:
        """Set a request up to run: its KV cache (from the prompt cache when its conversation
        was served before), the ids to feed, its token budget and random generator."""
        job = jobs[0]
        cache, ids = None, job.prompt_ids
        if isinstance(job.chat, ChatTurn) and job.chat.history:  # ChatGLM2's rounds only
            cache = self.prompt_cache.take(job.chat.history)
            if cache is not None:  # feed only the new round (spec §4.5)
                ids = chat_input_ids(self.tokenizer, job.chat.query, job.chat.history, cache)
        job.cache = cache if cache is not None else self.model.new_cache()
        try:
            job.budget = new_token_budget(job.config, len(ids), job.cache.length)
        except ValueError as err:
            job.on_event(Event(error=str(err)))
            self.counts["failed"] += 1
            return
        job.pending, job.seen = list(ids), list(ids)
        job.cached_tokens = job.cache.length
        job.prompt_tokens = job.cache.length + len(ids)
        job.rng = np.random.default_rng(job.config.seed)
        # A chat reply starts afresh, a completion continues; a ChatGLM3 reply is sent raw (its
        # first line names a tool or is empty: the web layer reads it, serve.chatglm3).
        context = [] if job.chat is not None else job.prompt_ids[-1:]
        chat2 = isinstance(job.chat, ChatTurn)
        job.text = TextStream(self.tokenizer, job.stop, chat2, context)
        self._active.append(job)

    def _step(self) -> None:
        reading = [j for j in self._active if j.pending]
        if reading:
            self._guarded([reading[0]], self._prefill_chunk)
        generating = [j for j in self._active if not j.pending]
        if generating:
            self._guarded(generating, self._decode)

    def _guarded(self, jobs: list[Job], work: Callable[[list[Job]], None]) -> None:
        """Run one piece of work; if it fails, its requests end with the error (their caches
        are unusable) and the server goes on with the others."""
        try:
            work(jobs)
        except Exception as err:
            log.exception("a scheduler step failed")
            for job in jobs:
                job.on_event(Event(error=f"internal error: {err}"))
                self.counts["failed"] += 1
                if job in self._active:
                    self._leave(job, keep_cache=False)

    def _prefill_chunk(self, jobs: list[Job]) -> None:
        job = jobs[0]
        if not job.prefill_total:
            job.prefill_total, job.prefill_started = len(job.pending), time.perf_counter()
        chunk, job.pending = job.pending[: self.prefill_chunk], job.pending[self.prefill_chunk :]
        logits = self.model.forward(np.asarray(chunk), job.cache, last_only=True)  # [1, V]
        if job.prefill_total >= LONG_PROMPT_TOKENS:
            log_prefill(job)
        if not job.pending:
            self._advance(job, logits[-1])

    def _decode(self, jobs: list[Job]) -> None:
        ids = np.array([[job.next_input] for job in jobs])  # [B, 1]
        caches = [job.cache for job in jobs]
        logits = self.model.forward_batch(ids, np.ones_like(ids), caches, last_only=True)
        for job, row_logits in zip(jobs, logits[:, -1]):  # row_logits [V]
            self._advance(job, row_logits)

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """The next token of one request from its logits [V]: send it on, or end the request."""
        if job.closing:  # its last token is now in the cache
            self._leave(job, keep_cache=True)
            return
        token = next_token(logits, job.seen, job.config, job.rng)
        if token in self.tokenizer.stop_ids:  # </s> (ChatGLM3: or <|user|>, <|observation|>)
            self._finish(job, "stop")
            return
        job.seen.append(token)
        job.generated += 1
        job.unsent.append(token_info(logits, token, job.logprobs, job.config.vocab_limit))
        text = job.text.add(token)
        job.next_input = token
        if job.text.stopped:
            self._finish(job, "stop", text)
        elif job.generated == job.budget:
            self._finish(job, "length", text)
        elif text:
            job.on_event(Event(text=text, tokens=tuple(job.unsent)))
            job.unsent = []

    def _finish(self, job: Job, reason: str, text: str = "") -> None:
        """End a request: send the text still held back (after `text`, not yet sent)."""
        text += "" if job.text.stopped else job.text.finish()
        usage = Usage(job.prompt_tokens, job.generated, job.cached_tokens)
        job.on_event(Event(text, tuple(job.unsent), reason, usage))
        job.unsent = []
        self.counts["finished"] += 1
        keep = isinstance(job.chat, ChatTurn) and not job.text.stopped
        if keep and reason == "length":
            job.closing = True  # the last token is not in the cache yet: the next step feeds it
        else:  # </s> is never fed: the cache already holds the whole conversation
            self._leave(job, keep_cache=keep)

    def _leave(self, job: Job, keep_cache: bool) -> None:
        self._active.remove(job)
        if keep_cache:  # (a client that leaves after the finish does not matter)
            rounds = (*job.chat.history, (job.chat.query, job.text.text))
            self.prompt_cache.put(rounds, job.cache)
        job.cache = None


def log_prefill(job: Job) -> None:
    """One log line on the progress of a long prompt's prefill."""
    done = job.prefill_total - len(job.pending)
    rate = done / max(time.perf_counter() - job.prefill_started, 1e-9)  # tokens/s
    log.info(
        "prefill %d/%d tokens, %.1f tokens/s, %.0f s left",
        done, job.prefill_total, rate, len(job.pending) / rate,
    )  # fmt: skip


def token_info(logits: np.ndarray, token: int, top: int | None, vocab_limit: int | None):
    """The chosen id with (when top is not None) its log-probability and the top likeliest ids
    with theirs, from the raw logits [V] over the first vocab_limit ids."""
    if top is None:
        return TokenInfo(token)
    logprobs = log_softmax(logits[:vocab_limit])  # [V]
    best = np.argpartition(-logprobs, top)[:top] if 0 < top < logprobs.size else []
    best = sorted(best, key=lambda i: -logprobs[i])
    return TokenInfo(
        token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in best)
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits [V] -> log-probabilities [V] (float64)."""
    z = logits.astype(np.float64) - np.max(logits)
    return z - np.log(np.sum(np.exp(z)))
