"""glm-numpy serve, tested as a client sees it: the official ``openai`` client (and raw HTTP for
malformed requests) against a live server on a free 127.0.0.1 port, running the embedded
default model; the chat page in a real headless chromium.

Every expected reply is computed in this process by the library itself (generate, ChatSession)
with the same settings, so the server is checked for exact agreement, not just for an answer.
"""

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer, ChatSession, GenerationConfig, generate
from glm_numpy.assets import default_model_path
from glm_numpy.generation import process_response

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from glm_numpy.serve.prompt_cache import PromptCache  # noqa: E402  (after the skips)
from glm_numpy.serve.protocol import ApiError, parse_messages  # noqa: E402
from glm_numpy.serve.text import TextStream  # noqa: E402

START_SECONDS = 60  # bound on waiting for a server to come up (numba compiles on a cold cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`glm-numpy serve` in a subprocess on a free port; `.url`, `.client`, `.stop()`."""

    def __init__(self, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "glm_numpy.cli", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            output, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return self.process.returncode, output


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", "8", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def library():
    """The default model and tokenizer in this process, to compute the expected replies."""
    path = default_model_path()
    return ChatGLM2.from_pretrained(path), ChatGLM2Tokenizer.from_pretrained(path)


def greedy(tokenizer, max_new_tokens, **options) -> GenerationConfig:
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        vocab_limit=tokenizer.vocab_size,
        max_length=2048,
        **options,
    )


def continuation(tokenizer, prompt: str, new_ids) -> str:
    """The text of new_ids after prompt, such that prompt + it is the whole text."""
    whole = tokenizer.decode(tokenizer.encode(prompt) + list(new_ids))
    assert whole.startswith(prompt)
    return whole[len(prompt) :]


def expected_completion(library, prompt: str, max_tokens: int) -> str:
    model, tokenizer = library
    new = generate(model, tokenizer.encode(prompt), greedy(tokenizer, max_tokens))
    return continuation(tokenizer, prompt, new)


def streamed_text(stream) -> tuple[str, list, object]:
    """Concatenate a chat stream -> (text, finish reasons, usage)."""
    text, reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return text, reasons, usage


# ---------------------------------------------------------------------------- the API
def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["default_model"]
    assert server.client.models.retrieve("default_model").id == "default_model"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "default_model"
    assert health["active"] == 0 and health["queued"] == 0 and health["max_batch"] == 8


def test_chat_plain_and_streamed_match_the_library(server, library):
    model, tokenizer = library
    expected = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=24).ask("秋夜")
    messages = [{"role": "user", "content": "秋夜"}]
    reply = server.client.chat.completions.create(
        model="default_model", messages=messages, temperature=0, max_tokens=24
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer.build_chat_input("秋夜"))
    assert reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24

    stream = server.client.chat.completions.create(
        model="default_model",
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, reasons, usage = streamed_text(stream)
    assert text == expected and reasons == ["length"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, 24)


def test_completions_and_finish_reason_stop(server, library):
    prompt = "To be, or not to be"
    reply = server.client.completions.create(
        model="default_model", prompt=prompt, temperature=0, max_tokens=20
    )
    assert reply.choices[0].text == expected_completion(library, prompt, 20)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 20
    # A chat reply that ends with </s> finishes with "stop" before its budget.
    reply = server.client.chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": "你好"}],
        temperature=0,
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 200


def test_seeded_sampling_matches_the_library(server, library):
    model, tokenizer = library
    prompt = "The king"
    config = GenerationConfig(
        temperature=0.9, top_p=0.95, max_new_tokens=16, seed=7, vocab_limit=tokenizer.vocab_size
    )
    expected = continuation(tokenizer, prompt, generate(model, tokenizer.encode(prompt), config))
    for _ in range(2):
        reply = server.client.completions.create(
            model="default_model", prompt=prompt, temperature=0.9, top_p=0.95, max_tokens=16, seed=7
        )
        assert reply.choices[0].text == expected


def test_logprobs(server, library):
    _, tokenizer = library
    reply = server.client.chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": "Tell me a story"}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=5,
    )
    entries = reply.choices[0].logprobs.content
    assert 1 <= len(entries) == reply.usage.completion_tokens <= 12
    for entry in entries:
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert sum(np.exp(values)) <= 1 + 1e-9
    assert "".join(e.token for e in entries).strip() == reply.choices[0].message.content

    completion = server.client.completions.create(
        model="default_model", prompt="Once", temperature=0, max_tokens=6, logprobs=3
    )
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert completion.choices[0].text.startswith(" ")  # "Once" + " more...": the space is kept


def test_stop_strings(server, library):
    prompt = "To be, or not to be"
    full = expected_completion(library, prompt, 40)
    stop = full[12:16]  # four characters from the middle of the greedy continuation
    cut = full[: full.index(stop)]
    reply = server.client.completions.create(
        model="default_model", prompt=prompt, temperature=0, max_tokens=40, stop=[stop, "@@@"]
    )
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    stream = server.client.completions.create(
        model="default_model", prompt=prompt, temperature=0, max_tokens=40, stop=stop, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == cut  # no piece of the stop string was ever sent


def test_prompt_cache_reuses_the_conversation(server, library):
    model, tokenizer = library
    session = ChatSession(model, tokenizer, do_sample=False, max_new_tokens=16)
    expected = [session.ask("春晓"), session.ask("再来一首")]
    messages = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "春晓"}]
    first = server.client.chat.completions.create(
        model="default_model", messages=messages, temperature=0, max_tokens=16
    )
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "再来一首"},
    ]
    second = server.client.chat.completions.create(
        model="default_model", messages=messages, temperature=0, max_tokens=16
    )
    # round 2 re-read nothing of round 1: all of it came from the cache
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens
    # Without the system message the same two rounds are ChatSession's, cache and all.
    plain = [{"role": "user", "content": "春晓"}]
    replies = []
    for query in ("春晓", "再来一首"):
        if replies:
            plain += [
                {"role": "assistant", "content": replies[-1]},
                {"role": "user", "content": query},
            ]
        reply = server.client.chat.completions.create(
            model="default_model", messages=plain, temperature=0, max_tokens=16
        )
        replies.append(reply.choices[0].message.content)
    assert replies == expected


def test_system_message_goes_before_the_first_query():
    turn = parse_messages(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}]},
        ]
    )
    assert turn.history == (("Be brief.\na", "b"),) and turn.query == "c"
    for messages, param in [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            "messages[1].role",
        ),
        ([{"role": "tool", "content": "a"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
    ]:
        with pytest.raises(ApiError) as caught:
            parse_messages(messages)
        assert caught.value.param == param and caught.value.status == 400


def test_text_stream_holds_back_a_possible_stop_string(library):
    _, tokenizer = library
    ids = tokenizer.encode("Hello, world. Observation: done", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["Observation:"])
    sent = ""
    for token in ids:
        sent += stream.add(token)
        assert "O" not in sent  # no beginning of the stop string is ever sent
        if stream.stopped:
            break
    assert stream.stopped and sent == "Hello, world. " and stream.text == sent


def test_prompt_cache_is_bounded_by_bytes(library):
    model, _ = library

    def filled(tokens: int):
        cache = model.new_cache()
        model.forward(np.arange(1, tokens + 1), cache)
        return cache

    per_token = filled(1).nbytes
    cache = PromptCache(max_bytes=25 * per_token)
    cache.put([("a", "1")], filled(10))
    cache.put([("b", "2")], filled(10))
    assert cache.take([("a", "1")]) is not None  # taken out: a conversation goes on once
    assert cache.take([("a", "1")]) is None
    cache.put([("c", "3")], filled(10))
    cache.put([("d", "4")], filled(10))  # over budget: the oldest ("b") goes
    assert cache.take([("b", "2")]) is None and len(cache) == 2
    cache.put([("e", "5")], filled(30))  # larger than the whole budget: not kept
    assert cache.take([("e", "5")]) is None


# ---------------------------------------------------------------------------- bad requests
BAD_REQUESTS = [  # (path, body, status, param named)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "m"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_p": 0},
        400,
        "top_p",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
        400,
        "stop",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "seed": 1.5},
        400,
        "seed",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        400,
        "stream",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
        400,
        "presence_penalty",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x " * 3000}]},
        400,
        "messages",
    ),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "word " * 3000}, 400, "prompt"),
    ("/v1/nothing", {}, 404, None),
    ("/v1/models/gpt-4", None, 404, "model"),
]


def send_bad(url: str, path: str, body) -> httpx.Response:
    if body is None:
        return httpx.get(url + path, timeout=30)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=30)


def test_bad_requests_get_a_4xx_in_the_openai_shape(server):
    for path, body, status, param in BAD_REQUESTS:
        response = send_bad(server.url, path, body)
        assert response.status_code == status, (path, body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    long = send_bad(server.url, *BAD_REQUESTS[17][:2]).json()["error"]
    assert long["code"] == "context_length_exceeded" and "2048" in long["message"]
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.chat.completions.create(
            model="default_model", messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    assert server.health()["status"] == "ok"


def test_eight_streams_beside_200_bad_requests_match_running_alone(server, library):
    """8 concurrent streams with 200 bad requests mixed in: every stream completes with the
    greedy reply it gets alone and the right usage; every bad request gets its 4xx."""
    model, tokenizer = library
    queries = ["秋夜", "春晓", "Tell me a story", "你好", "The sea", "月", "Hamlet", "山行"]
    alone = {}  # query -> (reply, generated ids)
    for q in queries:
        new = generate(model, tokenizer.build_chat_input(q), greedy(tokenizer, 24))
        alone[q] = (process_response(tokenizer.decode(new)), len(new))

    def stream(query):
        chunks = server.client.chat.completions.create(
            model="default_model",
            messages=[{"role": "user", "content": query}],
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        return streamed_text(chunks)

    def bad(i):
        path, body, status, _ = BAD_REQUESTS[i % 22]  # the 400s (no 404s)
        return send_bad(server.url, path, body).status_code == status

    with ThreadPoolExecutor(max_workers=16) as pool:
        streams = [pool.submit(stream, q) for q in queries]
        bad_ok = [pool.submit(bad, i) for i in range(200)]
        results = [f.result(timeout=120) for f in streams]
        assert sum(f.result(timeout=120) for f in bad_ok) == 200
    for query, (text, reasons, usage) in zip(queries, results):
        reply, generated = alone[query]
        assert text == reply, query
        assert reasons == ["length" if generated == 24 else "stop"]
        assert usage.prompt_tokens == len(tokenizer.build_chat_input(query))
        assert usage.completion_tokens == generated
    health = server.health()
    assert health["active"] == 0 and health["queued"] == 0 and health["requests"]["failed"] == 0


# ---------------------------------------------------------------------------- one slot, SIGTERM
def test_disconnect_frees_the_slot_queue_full_and_sigterm():
    s = Server("--max-batch", "1", "--max-queue", "1")
    try:
        long = {"model": "default_model", "prompt": "To be", "max_tokens": 2000, "temperature": 1.0}
        # A client that reads two chunks of a long stream, then hangs up.
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""
        follow_up = s.client.completions.create(
            model="default_model", prompt="Once", max_tokens=5, temperature=0, timeout=60
        )
        assert follow_up.usage.completion_tokens == 5
        assert s.health()["requests"]["cancelled"] == 1  # freed by the hang-up, not by finishing

        # One request runs, one waits, the next is turned away with a 429 and the server goes on.
        running = httpx.stream("POST", f"{s.url}/v1/completions", json={**long, "stream": True})
        events = running.__enter__().iter_lines()
        next(events)
        waiting = threading.Thread(
            target=lambda: httpx.post(
                f"{s.url}/v1/completions", json={**long, "max_tokens": 3}, timeout=60
            )
        )
        waiting.start()
        deadline = time.monotonic() + 30
        while s.health()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = httpx.post(f"{s.url}/v1/completions", json=long, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"

        # SIGTERM with a stream running: the process ends by itself, exit code 0.
        code, output = s.stop()
        running.__exit__(None, None, None)
        waiting.join(timeout=60)
        assert code == 0, output
        assert "Finished server process" in output
    finally:
        s.stop()


# ---------------------------------------------------------------------------- the chat page
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,800",
]


def test_chat_page_streams_a_reply_with_the_alternatives(server, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "model-name").text == "default_model")
        browser.find_element(By.ID, "look-inside").click()
        tokens = browser.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("40")
        browser.find_element(By.ID, "prompt").send_keys("秋夜")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant.done"))
        reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
        token_spans = reply.find_elements(By.CSS_SELECTOR, ".tok")
        assert token_spans and reply.text.strip()
        assert "error" not in browser.find_element(By.ID, "status").text
        token_spans[0].click()
        alternatives = browser.find_elements(By.CSS_SELECTOR, "#token-detail .alt")
        assert len(alternatives) == 5
        assert all(a.text.strip().endswith("%") for a in alternatives)
        browser.save_screenshot(str(tmp_path / "page.png"))

        # The stop button hangs up. With every slot taken by long streams, a reply waits in the
        # queue; stop it, and the server drops it.
        long = {
            "prompt": "To be, or not to be",
            "max_tokens": 2000,
            "temperature": 0,
            "stream": True,
        }
        blockers = [
            httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60)
            for _ in range(8)
        ]
        try:
            lines = [blocker.__enter__().iter_lines() for blocker in blockers]
            for line in lines:  # (kept: a line iterator closed would hang up)
                next(line)  # running
            cancelled = server.health()["requests"]["cancelled"]
            browser.find_element(By.ID, "prompt").send_keys("Hamlet")
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: server.health()["queued"] == 1)
            browser.find_element(By.ID, "stop").click()
            wait.until(lambda b: b.find_element(By.ID, "status").text == "stopped")
            wait.until(lambda b: server.health()["requests"]["cancelled"] == cancelled + 1)
            assert server.health()["queued"] == 0
        finally:
            for blocker in blockers:
                blocker.__exit__(None, None, None)
    finally:
        browser.quit()


def test_a_failing_request_ends_alone_and_the_scheduler_goes_on(library):
    from glm_numpy.serve.scheduler import Job, Scheduler, ShuttingDown

    model, tokenizer = library
    scheduler = Scheduler(model, tokenizer, max_batch=2)
    scheduler.start()
    try:
        done = {name: threading.Event() for name in ("bad", "good")}
        events = {name: [] for name in done}

        def listener(name):
            def on_event(event):
                events[name].append(event)
                if event.finish_reason or event.error:
                    done[name].set()

            return on_event

        # an id past the embedding's rows: the forward pass fails for this request only
        bad_ids = [model.config.padded_vocab_size + 5]
        scheduler.submit(Job(bad_ids, greedy(tokenizer, 4), listener("bad")))
        scheduler.submit(Job(tokenizer.encode("Once"), greedy(tokenizer, 4), listener("good")))
        assert all(event.wait(60) for event in done.values())
        assert events["bad"][-1].error and "internal error" in events["bad"][-1].error
        assert events["good"][-1].finish_reason == "length" and events["good"][-1].usage
        assert scheduler.counts["failed"] == 1 and scheduler.counts["finished"] == 1
    finally:
        scheduler.stop()
    with pytest.raises(ShuttingDown):  # the app answers this with a 503
        scheduler.submit(Job(tokenizer.encode("Once"), greedy(tokenizer, 4), listener("good")))


def test_serve_command_refuses_bad_options():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for options, message in [
            (["--max-batch", "0"], "--max-batch 0: out of range"),
            (["--model", "/nonexistent/model"], "not a directory"),
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ]:
            command = [sys.executable, "-m", "glm_numpy.cli", "serve", *options]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2 and message in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1


def test_a_long_prompt_logs_its_prefill_progress(library, caplog):
    from glm_numpy.serve.scheduler import LONG_PROMPT_TOKENS, Job, Scheduler

    model, tokenizer = library
    ids = tokenizer.encode("To be, or not to be, that is the question. " * 120)
    ids = ids[: LONG_PROMPT_TOKENS + 100]
    assert len(ids) == LONG_PROMPT_TOKENS + 100
    scheduler = Scheduler(model, tokenizer, max_batch=1, prefill_chunk=256)
    scheduler.start()
    done = threading.Event()
    try:
        with caplog.at_level(logging.INFO, logger="glm_numpy.serve"):
            on_event = lambda event: (event.finish_reason or event.error) and done.set()  # noqa: E731
            scheduler.submit(Job(ids, greedy(tokenizer, 2), on_event))
            assert done.wait(120)
    finally:
        scheduler.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prefill ")]
    total = len(ids)
    assert [line.split()[1] for line in lines] == [
        f"{min(fed, total)}/{total}" for fed in range(256, total + 256, 256)
    ]
    assert all("tokens/s" in line and "s left" in line for line in lines)
    with caplog.at_level(logging.INFO, logger="glm_numpy.serve"):
        caplog.clear()
        scheduler = Scheduler(model, tokenizer, max_batch=1)  # a short prompt logs nothing
        scheduler.start()
        finished = threading.Event()
        try:
            on_end = lambda event: (event.finish_reason or event.error) and finished.set()  # noqa: E731
            scheduler.submit(Job(tokenizer.encode("Once"), greedy(tokenizer, 2), on_end))
            assert finished.wait(60)
        finally:
            scheduler.stop()
        short = [r for r in caplog.records if r.getMessage().startswith("prefill ")]
    assert short == []
