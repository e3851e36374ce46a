"""Generation, sampling and chat with the behaviour of the official ChatGLM2 code (spec §4).

Each new token comes from the last position's logits through one chain of small functions,
in the order the official ``stream_generate`` applies them:

    logits [V] -> repetition penalty -> NaN/Inf guard -> temperature -> top-k -> top-p
               -> softmax -> sample (or argmax when do_sample is False)

A token is fed back through the model (one position, the KV cache holding the rest) until the
model produces </s> (id 2) or a length limit is reached. ``chat``/``stream_chat`` wrap this in the
ChatGLM2 prompt template; ``ChatSession`` keeps a conversation's KV cache between rounds, as the
official cli_demo does with ``past_key_values``.

Shape legend: T new tokens, V vocabulary rows, B batch rows.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from glm_numpy import chatglm3
from glm_numpy.cache import KVCache
from glm_numpy.chatglm3 import ChatGLM3Tokenizer
from glm_numpy.model import ChatGLM2
from glm_numpy.progress import progress_bar
from glm_numpy.tokenizer import EOS_ID, ChatGLM2Tokenizer, History, continuation_prompt, left_pad

FORCED_TOKEN_ON_INVALID_LOGITS = 5  # spec §4.3: the official InvalidScoreLogitsProcessor
INCOMPLETE_CHARACTER = "\ufffd"  # what decoding shows for an unfinished multi-byte character


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; the defaults are those of the official ``chat()`` (spec §4.3).

    max_length counts every token of the context: what the KV cache already holds, the prompt
    and the generated tokens. (The official stream_chat, reusing a cache, counts only the
    current round; counting it all keeps a conversation within max_length.) max_new_tokens,
    when set, also bounds the generated tokens.
    ``vocab_limit`` (when set) keeps ids >= it from ever being generated: chat sets it to the
    tokenizer's vocab_size, so the model's unused embedding rows (no text) are never picked.
    """

    do_sample: bool = True
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.8
    repetition_penalty: float = 1.0
    max_length: int = 8192
    max_new_tokens: int | None = None
    seed: int | None = None
    vocab_limit: int | None = None
    stop_ids: tuple[int, ...] = (EOS_ID,)  # chat sets the tokenizer's (ChatGLM3: + role tokens)

    def __post_init__(self):
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if self.do_sample and not self.temperature > 0:
            fail("temperature", "must be > 0 when sampling (use greedy decoding instead)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 turns top-k off)")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0 (1.0 turns it off)")
        if self.max_length < 1:
            fail("max_length", "must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            fail("max_new_tokens", "must be >= 1")


# ---------------------------------------------------------------------------- sampling chain
def apply_repetition_penalty(logits: np.ndarray, seen_ids: Sequence[int], penalty: float):
    """logits [V] -> [V]: every id already seen (prompt and output) is made less likely, as in
    transformers: a positive logit is divided by the penalty, a negative one multiplied."""
    if penalty == 1.0 or len(seen_ids) == 0:
        return logits
    ids = np.unique(np.asarray(seen_ids))
    ids = ids[ids < logits.shape[-1]]
    out = logits.copy()
    score = out[ids]
    out[ids] = np.where(score < 0, score * penalty, score / penalty)
    return out


def guard_invalid_logits(logits: np.ndarray) -> np.ndarray:
    """logits [V] -> [V]: if any logit is NaN or ±inf, all become 0 and token 5 gets 5e4, so
    token 5 is chosen (the official InvalidScoreLogitsProcessor, spec §4.3)."""
    if np.all(np.isfinite(logits)):
        return logits
    forced = np.zeros_like(logits)
    forced[FORCED_TOKEN_ON_INVALID_LOGITS] = 5e4
    return forced


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """logits [V] -> [V] / temperature: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / np.float32(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """logits [V] -> [V] with every logit below the k-th largest set to -inf (ties with the k-th
    are kept, as in transformers). k = 0 or k >= V keeps everything."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = np.partition(logits, -k)[-k]
    return np.where(logits < kth_largest, -np.inf, logits).astype(logits.dtype)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """logits [V] -> [V] keeping only the nucleus: the smallest set of most likely tokens whose
    probabilities add up to at least p (always at least one token); the rest become -inf."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")  # most likely first
    mass = np.cumsum(softmax(logits)[order])  # [V]
    kept = min(int(np.searchsorted(mass, p)) + 1, logits.shape[-1])
    out = np.full_like(logits, -np.inf)
    out[order[:kept]] = logits[order[:kept]]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """logits [V] -> probabilities [V] (float64, so tiny probabilities still add up to 1)."""
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One id drawn from probs [V] (inverse of the cumulative distribution at a uniform draw)."""
    cumulative = np.cumsum(probs)
    return min(
        int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")),
        probs.shape[-1] - 1,
    )


def next_token(
    logits: np.ndarray, seen_ids: Sequence[int], config: GenerationConfig, rng: np.random.Generator
) -> int:
    """The last position's logits [V] -> the next id, through the whole chain (module doc)."""
    if config.vocab_limit is not None:
        logits = logits[: config.vocab_limit]
    logits = apply_repetition_penalty(logits, seen_ids, config.repetition_penalty)
    logits = guard_invalid_logits(logits)
    if not config.do_sample:
        return int(np.argmax(logits))
    logits = apply_temperature(logits, config.temperature)
    logits = top_k_filter(logits, config.top_k)
    # Only the ids top-k kept can be drawn; going on with them alone gives the same
    # distribution without sorting the whole vocabulary.
    candidates = np.flatnonzero(logits > -np.inf)
    logits = top_p_filter(logits[candidates], config.top_p)
    return int(candidates[sample(softmax(logits), rng)])


# ---------------------------------------------------------------------------- generation loops
@dataclasses.dataclass
class GenerationStats:
    """Where the time of one generation went: the prompt (prefill) and each new token (decode)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos" or "length"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def new_token_budget(config: GenerationConfig, prompt_length: int, cached: int = 0) -> int:
    """How many tokens may be generated after a prompt of prompt_length tokens that follows
    `cached` tokens already in the KV cache (max_length counts them all)."""
    room = config.max_length - cached - prompt_length
    if room < 1:
        raise ValueError(
            f"the prompt ({prompt_length} tokens, after {cached} cached) leaves no room for a new "
            f"token within max_length={config.max_length}"
        )
    return room if config.max_new_tokens is None else min(room, config.max_new_tokens)


def model_token_budget(
    model: ChatGLM2, config: GenerationConfig, prompt_length: int, cached: int = 0
) -> int:
    """new_token_budget, also within the model's seq_length (its rotary table: no position
    beyond it exists). A max_new_tokens that cannot fit there is an error, not a silently
    shorter answer."""
    limit = model.config.seq_length
    asked = cached + prompt_length + (config.max_new_tokens or 1)
    if asked > limit:
        new = f"max_new_tokens={config.max_new_tokens}" if config.max_new_tokens else "1 new token"
        raise ValueError(
            f"the prompt ({prompt_length} tokens, after {cached} cached) plus {new} is {asked} "
            f"tokens, beyond this model's seq_length of {limit} tokens"
        )
    budget = new_token_budget(config, prompt_length, cached)
    return min(budget, limit - cached - prompt_length)


def generate_stream(
    model: ChatGLM2,
    prompt_ids: Sequence[int],
    config: GenerationConfig | None = None,
    cache: KVCache | None = None,
    rng: np.random.Generator | None = None,
    stats: GenerationStats | None = None,
    feed_final_token: bool = False,
    hooks: dict | None = None,
    progress: bool = False,
) -> Iterator[int]:
    """Feed prompt_ids [T] (after whatever `cache` holds) and yield each new id as it is chosen.

    Stops at </s> (config.stop_ids; never yielded, never fed) or at the length limit. The last
    yielded id is not fed through the model unless feed_final_token is set; set it when the cache
    is kept for a conversation, so that it then holds every token of the round except </s>
    (spec §4.5).
    The repetition penalty looks at prompt_ids and the output, as the official code does.
    hooks ({trace name or pattern: fn}, glm_numpy.hooks) apply to every forward pass, the prompt's
    and each new token's.
    progress=True shows the prefill on stderr (tokens done, tok/s, time left) once it has taken
    over a second; the bar is gone before the first id is yielded.
    """
    config = config or GenerationConfig()
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    cache = cache if cache is not None else model.new_cache()
    stats = stats if stats is not None else GenerationStats()
    budget = model_token_budget(model, config, len(prompt_ids), cache.length)
    seen = list(prompt_ids)

    started = time.perf_counter()
    with progress_bar(len(prompt_ids), "prefill", "tok", enabled=progress) as bar:
        heard = bar.update if progress else None  # the model reports each layer it is through
        logits = last_logits(model, np.asarray(prompt_ids), cache, hooks, heard)  # [V]
    token = next_token(logits, seen, config, rng)
    stats.prefill_tokens, stats.prefill_seconds = len(seen), time.perf_counter() - started
    for generated in range(1, budget + 1):
        if token in config.stop_ids:
            stats.stop_reason = "eos"
            return
        seen.append(token)
        yield token
        if generated == budget:
            break
        started = time.perf_counter()
        logits = last_logits(model, np.array([token]), cache, hooks)  # [V]
        token = next_token(logits, seen, config, rng)
        stats.decode_tokens += 1
        stats.decode_seconds += time.perf_counter() - started
    stats.stop_reason = "length"
    if feed_final_token:
        last_logits(model, np.array([token]), cache, hooks)


def last_logits(
    model: ChatGLM2, ids: np.ndarray, cache: KVCache, hooks: dict | None, progress=None
):
    """Feed ids [T] -> the last position's logits [V]. Hooks and a progress callback are passed
    only when there are some, so any object with ``forward(ids, cache, last_only)`` can stand in
    for the model."""
    extra = {"hooks": hooks} if hooks else {}
    if progress is not None:
        extra["progress"] = progress
    return model.forward(ids, cache, last_only=True, **extra)[-1]


def generate(
    model: ChatGLM2,
    prompt_ids: Sequence[int],
    config: GenerationConfig | None = None,
    rng: np.random.Generator | None = None,
    hooks: dict | None = None,
) -> list[int]:
    """prompt_ids -> the generated ids (without the final </s>); hooks as in generate_stream."""
    return list(generate_stream(model, prompt_ids, config, rng=rng, hooks=hooks))


def generate_batch(
    model: ChatGLM2,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    rng: np.random.Generator | None = None,
    hooks: dict | None = None,
) -> list[list[int]]:
    """Several prompts at once, left-padded into one batch -> the generated ids of each.

    Each row has its own KV cache and its own length budget (its own prompt length counts, not
    the padding), and leaves the batch when it ends, so greedy output of a row equals generating
    that row alone. Sampled rows draw from one generator, in row order. Hooks (as in
    generate_stream) are called once per row of each pass.
    """
    config = config or GenerationConfig()
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    budgets = [model_token_budget(model, config, len(p)) for p in prompts]
    batch = left_pad(prompts)
    caches = [model.new_cache() for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    seen = [list(p) for p in prompts]
    active = list(range(len(prompts)))
    with_hooks = {"hooks": hooks} if hooks else {}  # as in last_logits
    logits = model.forward_batch(
        batch.input_ids, batch.attention_mask, caches, last_only=True, **with_hooks
    )
    while active:
        still_active = []
        for row, row_logits in zip(active, logits[:, -1]):  # row_logits [V]
            token = next_token(row_logits, seen[row], config, rng)
            if token in config.stop_ids:
                continue
            outputs[row].append(token)
            seen[row].append(token)
            if len(outputs[row]) < budgets[row]:
                still_active.append(row)
        active = still_active
        if active:
            new_ids = np.array([[outputs[row][-1]] for row in active])  # [B', 1]
            feeding = [caches[row] for row in active]
            ones = np.ones_like(new_ids)
            logits = model.forward_batch(new_ids, ones, feeding, last_only=True, **with_hooks)
    return outputs


def decode_stream(tokenizer: ChatGLM2Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Generated ids, one at a time -> the text of all ids so far, after each id, skipping texts
    that end in U+FFFD (a character whose UTF-8 bytes have not all arrived yet, spec §4.5)."""
    ids: list[int] = []
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if text and not text.endswith(INCOMPLETE_CHARACTER):
            yield text


# ---------------------------------------------------------------------------- chat
def process_response(response: str) -> str:
    """Spec §4.6: strip surrounding whitespace, fill in the training-date placeholder."""
    return response.strip().replace("[[训练时间]]", "2023年")


def chat_input_ids(
    tokenizer: ChatGLM2Tokenizer, query: str, history: History, cache: KVCache | None
) -> list[int]:
    """The ids a chat round feeds. With an empty cache: the whole prompt, history included,
    after [gMASK] sop. With a cache holding the earlier rounds (spec §4.5): only the new round's
    text, without special tokens and without its first id (the dummy-prefix piece '▁' that
    SentencePiece puts before any text), continuing the cached positions."""
    if cache is None or cache.length == 0:
        return tokenizer.build_chat_input(query, history)
    if not history:
        raise ValueError("a non-empty KV cache needs the history of the rounds it holds")
    return tokenizer.encode(continuation_prompt(query, history), add_special_tokens=False)[1:]


def chat_config(tokenizer: ChatGLM2Tokenizer, options: dict) -> GenerationConfig:
    """Keyword sampling options (GenerationConfig fields) -> the config chat uses."""
    defaults = {"vocab_limit": tokenizer.vocab_size, "stop_ids": tuple(tokenizer.stop_ids)}
    return GenerationConfig(**{**defaults, **options})


def stream_chat(
    model: ChatGLM2,
    tokenizer: ChatGLM2Tokenizer,
    query: str,
    history: History | None = None,
    past_key_values: KVCache | None = None,
    return_past_key_values: bool = False,
    rng: np.random.Generator | None = None,
    role: str = "user",
    progress: bool = False,
    **options,
) -> Iterator[tuple]:
    """Yield (response, history + [(query, response)]) after each new token, as the official
    ``stream_chat``: the response so far is decoded and post-processed, and a response ending
    in an incomplete character (U+FFFD) is not yielded.

    With a ChatGLM3Tokenizer, ChatGLM3's format instead (glm_numpy.chatglm3): history is a list
    of messages {"role", "content", "metadata"?, "tools"?}, the query is sent as a `role`
    message ("user", or "observation" for a tool's result), and the response is text or, for a
    tool call, {"name", "parameters"}. A reply is yielded once its first line has ended (that
    line names the tool of a tool call: the official code shows it as text until then), and a
    tool call once its arguments can be read.

    Cross-round cache reuse (spec §4.5): pass the KV cache of the earlier rounds as
    past_key_values (with the history it holds) and only the new round is encoded and fed. The
    cache is extended in place; with return_past_key_values=True it is yielded as a third item
    (a new cache when none was given). At the end of the round it holds every token of the
    conversation except the stop id, ready for the next round (the official code also leaves out
    the last token of a round cut by the length limit; here it is fed, so cache and history
    agree). A round abandoned halfway (the stream closed, Ctrl-C) leaves the cache unusable:
    start the next round without it (the prompt is then re-encoded from the history).

    options: GenerationConfig fields (temperature, top_p, top_k, repetition_penalty, do_sample,
    max_length, max_new_tokens, seed); defaults as the official chat(). progress: as in
    generate_stream.
    """
    if isinstance(tokenizer, ChatGLM3Tokenizer):
        yield from stream_chat3(
            model, tokenizer, query, history, past_key_values, return_past_key_values, rng, role,
            options, progress,
        )  # fmt: skip
        return
    check_no_roles(role)
    history = list(history or [])
    config = chat_config(tokenizer, options)
    cache = past_key_values if past_key_values is not None else model.new_cache()
    prompt_ids = chat_input_ids(tokenizer, query, history, cache)
    kept = past_key_values is not None or return_past_key_values
    tokens = generate_stream(
        model, prompt_ids, config, cache, rng, feed_final_token=kept, progress=progress
    )
    for text in decode_stream(tokenizer, tokens):
        response = process_response(text)
        turn = history + [(query, response)]
        yield (response, turn, cache) if return_past_key_values else (response, turn)


def stream_chat3(
    model,
    tokenizer,
    query,
    history,
    past_key_values,
    return_past_key_values,
    rng,
    role,
    options,
    progress=False,
) -> Iterator[tuple]:
    """stream_chat in ChatGLM3's format (see stream_chat). With a cache holding the earlier
    rounds only the new message and <|assistant|> are fed: the turn the model ended with a stop
    id continues straight into the next role token. (The official code feeds [gMASK] sop again
    before it, in the middle of the conversation; here cache and re-encoded history agree.)"""
    history = list(history or [])
    config = chat_config(tokenizer, options)
    cache = past_key_values if past_key_values is not None else model.new_cache()
    if cache.length == 0:
        prompt_ids = tokenizer.build_chat_input(query, history, role)
    else:
        prompt_ids = tokenizer.continuation_ids(query, role)
    asked = history + [{"role": role, "content": query}]
    kept = past_key_values is not None or return_past_key_values
    tokens = generate_stream(
        model, prompt_ids, config, cache, rng, feed_final_token=kept, progress=progress
    )
    unshown = None  # the reply so far, when it could not be shown yet
    for text in decode_stream(tokenizer, tokens):
        unshown = text
        if "\n" not in text.rsplit("<|assistant|>", 1)[-1]:
            continue  # the segment's first line may still turn out to be a tool's name
        try:
            response, turn = chatglm3.process_response(text, asked)
        except chatglm3.ToolCallError:
            continue  # a tool call whose arguments are still coming
        unshown = None
        yield (response, turn, cache) if return_past_key_values else (response, turn)
    if unshown is not None:  # the end: shown as it is (a tool call that cannot be read raises)
        response, turn = chatglm3.process_response(unshown, asked)
        yield (response, turn, cache) if return_past_key_values else (response, turn)


def check_no_roles(role: str) -> None:
    if role != "user":
        raise ValueError(f"role={role!r}: ChatGLM2 has no roles (only ChatGLM3 does)")


def chat(
    model: ChatGLM2,
    tokenizer: ChatGLM2Tokenizer,
    query: str,
    history: History | None = None,
    rng: np.random.Generator | None = None,
    role: str = "user",
    **options,
) -> tuple:
    """One chat round, as the official ``chat()``: the whole prompt (history included) encoded,
    a reply generated and post-processed -> (response, history + [(query, response)]).
    With a ChatGLM3Tokenizer: ChatGLM3's messages, roles and tool calls (see stream_chat)."""
    history = list(history or [])
    config = chat_config(tokenizer, options)
    if isinstance(tokenizer, ChatGLM3Tokenizer):
        new_ids = generate(model, tokenizer.build_chat_input(query, history, role), config, rng)
        asked = history + [{"role": role, "content": query}]
        return chatglm3.process_response(tokenizer.decode(new_ids), asked)
    check_no_roles(role)
    new_ids = generate(model, tokenizer.build_chat_input(query, history), config, rng)
    response = process_response(tokenizer.decode(new_ids))
    return response, history + [(query, response)]


class ChatSession:
    """A conversation that keeps its KV cache between rounds, so each round feeds only its own
    text (what the official cli_demo does with past_key_values).

        session = ChatSession(model, tokenizer, temperature=0.8)
        for partial in session.stream("你好"):
            ...
        session.history  # [("你好", response)]

    With a ChatGLM3Tokenizer the history is ChatGLM3's list of messages, opened by a system
    message when `system` or `tools` is given, and stream(result, role="observation") answers
    a tool call (the reply is then {"name", "parameters"}, see stream_chat).

    A reply interrupted halfway stays in the history as far as it went; the cache, then
    incomplete, is dropped, and the next round re-encodes the whole history.
    """

    def __init__(
        self,
        model: ChatGLM2,
        tokenizer: ChatGLM2Tokenizer,
        system: str | None = None,
        tools: list | None = None,
        progress: bool = False,
        **options,
    ):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress
        self.config = chat_config(tokenizer, options)
        self.rng = np.random.default_rng(self.config.seed)
        self.opening: list = []  # what clear() keeps: ChatGLM3's system message
        if tools is not None or system is not None:
            if not isinstance(tokenizer, ChatGLM3Tokenizer):
                raise ValueError(
                    "a system prompt and tools need a ChatGLM3 model (ChatGLM2 has none)"
                )
            if tools is not None:
                self.opening = [chatglm3.tool_system_message(tools, system or chatglm3.TOOL_PROMPT)]
            else:
                self.opening = [{"role": "system", "content": system}]
        self.history: list = list(self.opening)
        self.cache: KVCache | None = None

    def clear(self) -> None:
        """Forget the conversation (history and cache); a system message stays."""
        self.history, self.cache = list(self.opening), None

    def stream(self, query: str, role: str = "user") -> Iterator:
        """Yield the reply to `query` as it grows; the round joins the history at the end."""
        cache = self.cache if self.cache is not None else self.model.new_cache()
        self.cache = None  # until the round completes, the cache is not a whole conversation
        turn, completed = None, False
        options = dataclasses.asdict(self.config)
        try:
            for response, turn_so_far, _ in stream_chat(
                self.model,
                self.tokenizer,
                query,
                self.history,
                past_key_values=cache,
                return_past_key_values=True,
                rng=self.rng,
                role=role,
                progress=self.progress,
                **options,
            ):
                turn = turn_so_far
                yield response
            completed = True
        finally:
            self.history = turn if turn is not None else self.unanswered(query, role)
            self.cache = cache if completed else None

    def unanswered(self, query: str, role: str) -> list:
        """The history after `query` when no reply came (the reply is empty)."""
        if isinstance(self.tokenizer, ChatGLM3Tokenizer):
            asked = self.history + [{"role": role, "content": query}]
            return chatglm3.process_response("", asked)[1]
        return self.history + [(query, "")]

    def ask(self, query: str, role: str = "user"):
        """The whole reply to `query` (ChatGLM3: text, or a tool call as a dict)."""
        last = ""
        for partial in self.stream(query, role):
            last = partial
        return last
