"""``glm-numpy serve``: an OpenAI-compatible HTTP server with continuous batching and a chat page.

    app.py        routes and responses (Starlette); handlers never touch the model
    protocol.py   OpenAI request checking and response shapes; the chat template mapping
    scheduler.py  the one thread that owns the model: continuous batching
    prompt_cache.py  KV caches of finished conversations, reused by their next round
    text.py       generated ids -> text safe to stream (incomplete characters, stop strings)
    static/       the chat page

Needs the ``serve`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import logging
import signal

import numpy as np

from glm_numpy.model import ChatGLM2
from glm_numpy.serve.app import create_app
from glm_numpy.tokenizer import ChatGLM2Tokenizer

GRACEFUL_SHUTDOWN_SECONDS = 10  # after SIGTERM, connections get this long to close


def serve(
    model: ChatGLM2,
    tokenizer: ChatGLM2Tokenizer,
    model_id: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    **options,
) -> None:
    """Serve until SIGINT/SIGTERM (options: create_app's max_batch, max_queue, prefill_chunk,
    prompt_cache_bytes)."""
    import uvicorn

    # Compile the kernels (or load them from numba's cache) and page the weights in before the
    # first request, so that its time to first token is not the start-up's.
    model.forward_batch(
        np.zeros((2, 1), dtype=np.int64), np.ones((2, 1)), [model.new_cache() for _ in range(2)]
    )
    app = create_app(model, tokenizer, model_id, **options)
    show_info_logs()
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.close()  # running replies end now (with an error event), none start
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    # uvicorn raises SIGTERM again once it has shut down gracefully, to die of it; by then all is
    # done, so ``glm-numpy serve`` returns and exits with 0 instead.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def show_info_logs() -> None:
    """The server's own log lines (a long prompt's prefill progress) on stderr, beside
    uvicorn's, unless the application configured logging itself."""
    log = logging.getLogger("glm_numpy.serve")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


__all__ = ["create_app", "serve"]
