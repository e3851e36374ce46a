"""The HTTP side: OpenAI-compatible routes and the chat page, on Starlette (ASGI).

    GET  /                      the chat page (static/: plain HTML, JS and CSS, no build step)
    GET  /health                status, model, active and queued requests
    GET  /v1/models             the one model served
    POST /v1/chat/completions   chat in the model's template (stream: server-sent events);
                                ChatGLM3 models take `tools` (serve.chatglm3)
    POST /v1/completions        plain continuation of a prompt

Handlers check and tokenize the request (glm_numpy.serve.protocol), hand a ``Job`` to the
scheduler thread, and turn its events into the response or the stream. They never touch the
model. Any error is answered in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from glm_numpy.chatglm3 import ChatGLM3Tokenizer
from glm_numpy.model import ChatGLM2
from glm_numpy.serve.chatglm3 import Conversation3, ReplyStream3, parse_messages3, read_reply
from glm_numpy.serve.protocol import (
    ApiError,
    Options,
    Shaper,
    check_context,
    parse_messages,
    parse_options,
    parse_prompt,
)
from glm_numpy.serve.scheduler import Event, Job, QueueFull, Scheduler, ShuttingDown
from glm_numpy.tokenizer import ChatGLM2Tokenizer

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 << 20
DISCONNECT_POLL_SECONDS = 0.5
log = logging.getLogger("glm_numpy.serve")


def create_app(
    model: ChatGLM2,
    tokenizer: ChatGLM2Tokenizer,
    model_id: str,
    max_batch: int = 8,
    max_queue: int = 64,
    prefill_chunk: int = 128,
    prompt_cache_bytes: int = 1 << 30,
) -> Starlette:
    """The ASGI app; its lifespan starts the scheduler thread and stops it on shutdown."""
    scheduler = Scheduler(model, tokenizer, max_batch, max_queue, prefill_chunk, prompt_cache_bytes)
    max_length = model.config.seq_length
    vocab_limit = tokenizer.vocab_size
    chatglm3 = isinstance(tokenizer, ChatGLM3Tokenizer)  # its roles and tools (load_tokenizer)

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": model_id,
                "family": "chatglm3" if chatglm3 else "chatglm2",
                "active": scheduler.active,
                "queued": scheduler.queued,
                "max_batch": scheduler.max_batch,
                "max_queue": scheduler.max_queue,
                "requests": {k: scheduler.counts[k] for k in ("finished", "cancelled", "failed")},
            }
        )

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "glm-numpy"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        if request.path_params["name"] != model_id:
            name = request.path_params["name"]
            raise ApiError(
                404,
                f"model {name!r} not found; this server has {model_id!r}",
                "model",
                "model_not_found",
            )
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        options = parse_options(
            body, chat=True, vocab_limit=vocab_limit, max_length=max_length, tools=chatglm3
        )
        if chatglm3:
            turn = parse_messages3(body.get("messages"), body.get("tools"))
            ids = tokenizer.build_chat_input(turn.query, turn.history, turn.role)
        else:
            turn = parse_messages(body.get("messages"))
            ids = tokenizer.build_chat_input(turn.query, turn.history)
        check_context(ids, max_length, "messages")
        shaper = Shaper(tokenizer, model_id, chat=True)
        return await run(request, ids, options, shaper, turn)

    async def completions(request: Request) -> Response:
        body = await read_json(request)
        options = parse_options(body, chat=False, vocab_limit=vocab_limit, max_length=max_length)
        ids = tokenizer.encode(parse_prompt(body))
        check_context(ids, max_length, "prompt")
        shaper = Shaper(tokenizer, model_id, chat=False)
        return await run(request, ids, options, shaper, None)

    async def run(request, ids, options: Options, shaper: Shaper, turn) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(event: Event) -> None:  # called by the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel()

        job = Job(ids, options.config, on_event, options.stop, options.logprobs, turn)
        try:
            scheduler.submit(job)
        except QueueFull as err:
            raise ApiError(
                429,
                f"the server is busy: {err}; retry later",
                None,
                "queue_full",
                "rate_limit_error",
            ) from None
        except ShuttingDown as err:
            raise ApiError(503, str(err), None, "shutting_down", "server_error") from None
        if options.stream:
            return StreamingResponse(
                stream_events(job, events, options, shaper),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await whole_response(request, job, events, options, shaper)

    async def whole_response(request, job, events, options: Options, shaper: Shaper) -> Response:
        text, tokens = [], []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if event.error:
                    raise ApiError(500, event.error, None, "generation_failed")
                text.append(event.text)
                tokens.extend(event.tokens)
                if event.finish_reason:
                    logprobs = options.logprobs is not None
                    reply, reason, tool_calls = "".join(text), event.finish_reason, None
                    if isinstance(job.chat, Conversation3):
                        reply, tool_calls = read_reply(reply, job.chat)
                        reason = "tool_calls" if tool_calls else reason
                    body = shaper.whole(reply, tokens, reason, event.usage, logprobs, tool_calls)
                    return JSONResponse(body)
        finally:
            job.cancel()  # a no-op once finished; frees the slot if the client went away

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/models/{name:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.scheduler = scheduler
    return app


async def stream_events(job: Job, events: asyncio.Queue, options: Options, shaper: Shaper):
    """Server-sent events: one `data: {chunk}` per piece of text, the finish chunk, the usage
    chunk when asked (stream_options.include_usage), then `data: [DONE]`."""
    logprobs = options.logprobs is not None
    # A ChatGLM3 reply is read as it comes: its text once its first line shows it is not a tool
    # call, a tool call whole at the end; the tokens go with the text they make.
    chatglm3 = ReplyStream3(job.chat) if isinstance(job.chat, Conversation3) else None
    held: list = []  # ChatGLM3: tokens whose text is not sent yet
    try:
        if shaper.chat:  # the role comes first, as OpenAI sends it
            yield sse(shaper.chunk("", (), first=True))
        while True:
            event = await events.get()
            if event.error:
                yield sse(ApiError(500, event.error, None, "generation_failed").body())
                break
            text, tokens, reason = event.text, event.tokens, event.finish_reason
            if chatglm3 is not None:
                held += tokens
                text = chatglm3.add(text)
                if reason:
                    rest, tool_calls = chatglm3.finish()
                    text += rest
                    if tool_calls:
                        yield sse(shaper.tool_calls_chunk(tool_calls))
                        reason = "tool_calls"
                tokens, held = (held, []) if text or reason else ((), held)
            if text or tokens:
                yield sse(shaper.chunk(text, tokens, logprobs=logprobs))
            if reason:
                yield sse(shaper.chunk("", (), reason))
                if options.include_usage:
                    yield sse(shaper.usage_chunk(event.usage))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away (or the request is over): leave the batch


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"the request body is larger than {MAX_BODY_BYTES} bytes", None, "body_too_large"
        )
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(
            400, f"the request body is not valid JSON ({err})", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


async def api_error(request: Request, err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(request: Request, err: HTTPException) -> Response:
    """404 for an unknown route, 405 for a wrong method..., in the OpenAI error shape."""
    if err.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    else:
        message = f"{request.method} {request.url.path}: {err.detail}"
    code = "not_found" if err.status_code == 404 else None
    return JSONResponse(
        ApiError(err.status_code, message, None, code).body(), status_code=err.status_code
    )


async def internal_error(request: Request, err: Exception) -> Response:
    log.exception("unexpected error")
    body = ApiError(500, f"internal error: {type(err).__name__}: {err}").body()
    return JSONResponse(body, status_code=500)
