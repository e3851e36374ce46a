"""The OpenAI API's shapes: request bodies checked field by field, responses and chunks built.

Every bad value becomes an ``ApiError`` that names the field (``param``), answered in the OpenAI
error shape ``{"error": {"message", "type", "param", "code"}}``. Options this server cannot honour
(n > 1, tools for ChatGLM2, logit_bias...) are refused, never silently ignored; unknown extra
fields are ignored, as clients add their own.

ChatGLM3 models' messages and tools are read by serve.chatglm3. ChatGLM2's map onto its
template (spec §4.4): after any leading system messages,
user and assistant messages alternate and the last one is the user's new query. ChatGLM2 has no
system role: the system text is put at the start of the FIRST user message, followed by a line
feed, so every later round of a conversation keeps the same prefix (and its cached keys).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence

from glm_numpy.generation import GenerationConfig
from glm_numpy.serve.scheduler import ChatTurn, TokenInfo, Usage
from glm_numpy.tokenizer import ChatGLM2Tokenizer

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
CHAT_DEFAULTS = {"temperature": 0.8, "top_p": 0.8}  # the official chat()'s (spec §4.3)
COMPLETION_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
REFUSED = {  # field -> why; refused when present with a value that asks for something
    "tools": "tools (function calling) need a ChatGLM3 model; this server's is ChatGLM2",
    "functions": "functions (function calling) are not supported by this server",
    "tool_choice": 'tool_choice: only "auto" or "none" (the model chooses)',
    "function_call": "function_call is not supported: this server has no functions",
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (insertion) is not supported",
    "audio": "audio output is not supported",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param, "invalid_value")


@dataclasses.dataclass(frozen=True)
class Options:
    """What both endpoints take besides the prompt."""

    config: GenerationConfig
    stop: tuple[str, ...]
    logprobs: int | None  # None: no logprobs; k: the chosen token's and k alternatives
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------- requests
def parse_options(
    body: dict, chat: bool, vocab_limit: int, max_length: int, tools: bool = False
) -> Options:
    """A request body's sampling and output options, checked (ApiError naming the field).
    tools: the model takes `tools` (ChatGLM3; they are read by serve.chatglm3)."""
    refuse_unsupported(body, chat, ("tools",) if tools else ())
    defaults = CHAT_DEFAULTS if chat else {"temperature": 1.0, "top_p": 1.0}
    temperature = number(body, "temperature", defaults["temperature"], 0.0, 2.0)
    top_p = number(body, "top_p", defaults["top_p"], 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p", "must be > 0 and <= 1")
    max_tokens = integer(body, "max_tokens", None, 1)
    if chat:
        max_tokens = integer(body, "max_completion_tokens", max_tokens, 1)
    elif max_tokens is None:
        max_tokens = COMPLETION_MAX_TOKENS
    config = GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=integer(body, "top_k", GenerationConfig.top_k, 0),
        max_length=max_length,
        max_new_tokens=max_tokens,
        seed=integer(body, "seed", None, -(2**63), 2**64 - 1),
        vocab_limit=vocab_limit,
    )
    if config.seed is not None and config.seed < 0:  # numpy seeds are >= 0; any int is accepted
        config = dataclasses.replace(config, seed=config.seed % 2**64)
    stream = boolean(body, "stream", False)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad("stream_options", "must be an object")
        if not stream:
            raise bad("stream_options", "is only allowed with stream: true")
        include_usage = boolean(stream_options, "include_usage", False, "stream_options.")
    return Options(config, stop_strings(body), logprobs_option(body, chat), stream, include_usage)


def refuse_unsupported(body: dict, chat: bool, accepted=()) -> None:
    for field, why in REFUSED.items():
        value = None if field in accepted else body.get(field)
        if value not in (None, [], {}, "", "none", "auto"):
            raise ApiError(400, why, field, "unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise ApiError(
            400, "n: only n = 1 is supported (one choice per request)", "n", "unsupported_parameter"
        )
    if not chat and body.get("best_of") not in (None, 1):
        raise ApiError(
            400, "best_of: only best_of = 1 is supported", "best_of", "unsupported_parameter"
        )
    if not chat and body.get("echo") not in (None, False):
        raise ApiError(
            400, "echo: echoing the prompt is not supported", "echo", "unsupported_parameter"
        )
    for field in ("presence_penalty", "frequency_penalty"):
        if body.get(field) not in (None, 0, 0.0):
            raise ApiError(400, f"{field}: only 0 is supported", field, "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(
            400,
            'response_format: only {"type": "text"} is supported',
            "response_format",
            "unsupported_parameter",
        )


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(name, f"must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def integer(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(name, f"must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise bad(name, f"must be an integer <= {high}, got {value!r}")
    return value


def boolean(body: dict, name: str, default: bool, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(prefix + name, f"must be true or false, got {value!r}")
    return value


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise bad(
            "stop", f"must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them"
        )
    return tuple(stops)


def logprobs_option(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = boolean(body, "logprobs", False)
        top = integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not wanted:
            raise bad("top_logprobs", "needs logprobs: true")
        return (top or 0) if wanted else None
    return integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)


def parse_messages(messages) -> ChatTurn:
    """OpenAI chat messages -> the ChatGLM2 conversation: earlier (query, response) rounds and
    the new query (module doc: where a system message goes)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    system, turns = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "must be an object with role and content")
        role = message.get("role")
        content = message_text(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            if turns:
                raise bad(f"{where}.role", "a system message must come before the conversation")
            system.append(content)
        elif role in ("user", "assistant"):
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise bad(f"{where}.role", f"expected {expected!r}: user and assistant alternate")
            turns.append(content)
        else:
            raise bad(f"{where}.role", f"must be system, user or assistant, got {role!r}")
    if len(turns) % 2 == 0:
        raise bad("messages", "the last message must be the user's (the query to answer)")
    if system:
        turns[0] = "\n".join(system) + "\n" + turns[0]
    history = tuple((turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2))
    return ChatTurn(history, turns[-1])


def message_text(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad(where, "must be a string or a list of text parts (images are not supported)")


def parse_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("prompt", "must be a string (one prompt per request)")
    return prompt


def check_context(ids: Sequence[int], max_length: int, param: str) -> None:
    if len(ids) >= max_length:
        raise ApiError(
            400,
            f"{param}: the prompt is {len(ids)} tokens, beyond this model's context of "
            f"{max_length} tokens (room is needed for at least one new token)",
            param,
            "context_length_exceeded",
        )


# ---------------------------------------------------------------------------- responses
class Shaper:
    """Builds the response objects and stream chunks of one request."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer, model_id: str, chat: bool):
        self.tokenizer, self.model_id, self.chat = tokenizer, model_id, chat
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text_offset = 0  # completions: where the next token's text starts

    def _envelope(self, object_name: str, choices: list, usage: Usage | None = None) -> dict:
        body = {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage_body(usage)
        return body

    def chunk(self, text: str, tokens, finish_reason=None, logprobs=False, first=False) -> dict:
        """A stream chunk carrying text (and its tokens' logprobs when asked)."""
        lp = self.logprobs(tokens) if logprobs else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text and not first:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def tool_calls_chunk(self, tool_calls: list) -> dict:
        """A chat stream chunk carrying whole tool calls."""
        calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice = {"index": 0, "delta": {"tool_calls": calls}, "logprobs": None}
        return self._envelope("chat.completion.chunk", [{**choice, "finish_reason": None}])

    def usage_chunk(self, usage: Usage) -> dict:
        name = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(name, [], usage)

    def whole(
        self, text: str, tokens, finish_reason: str, usage: Usage, logprobs: bool, tool_calls=None
    ) -> dict:
        """The non-streamed response (a chat reply may be tool_calls, with no content)."""
        lp = self.logprobs(tokens) if logprobs else None
        if self.chat:
            message = {"role": "assistant", "content": text}
            if tool_calls:
                message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": lp,
                "finish_reason": finish_reason,
            }
            return self._envelope("chat.completion", [choice], usage)
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice], usage)

    def logprobs(self, tokens: Sequence[TokenInfo]) -> dict:
        if self.chat:
            return {"content": [self._chat_entry(t) for t in tokens], "refusal": None}
        strings = [self.token_string(t.id) for t in tokens]
        offsets = []
        for s in strings:
            offsets.append(self.text_offset)
            self.text_offset += len(s)
        return {
            "tokens": strings,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self.token_string(i): lp for i, lp in t.top} for t in tokens],
            "text_offset": offsets,
        }

    def _chat_entry(self, token: TokenInfo) -> dict:
        entry = self._token_entry(token.id, token.logprob)
        entry["top_logprobs"] = [self._token_entry(i, lp) for i, lp in token.top]
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        return {"token": self.token_string(token), "logprob": logprob, "bytes": self.bytes(token)}

    def token_string(self, token: int) -> str:
        """A token as text: its SentencePiece piece with '▁' as a space; a byte piece is its
        character when ASCII, else stays '<0xE4>' (one byte of a character spread over several
        tokens); special ids by name."""
        sp = self.tokenizer.sp
        if token < sp.GetPieceSize() and sp.IsByte(token) and self.bytes(token)[0] < 0x80:
            return chr(self.bytes(token)[0])  # an ASCII byte (a line feed...) is its character
        if token < sp.GetPieceSize() and not sp.IsControl(token) and not sp.IsByte(token):
            return sp.IdToPiece(token).replace("\u2581", " ")
        return self.tokenizer.pieces([token])[0]

    def bytes(self, token: int) -> list[int]:
        sp = self.tokenizer.sp
        if token < sp.GetPieceSize() and sp.IsByte(token):
            return [int(sp.IdToPiece(token)[3:5], 16)]
        if token < sp.GetPieceSize() and not sp.IsControl(token):
            return list(self.token_string(token).encode())
        return []


def usage_body(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
