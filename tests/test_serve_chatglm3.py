"""glm-numpy serve with a ChatGLM3 model: its template, and OpenAI `tools` round trips.

A tiny ChatGLM3 directory (random weights, the real tokenizer.model, the official files that
say it is ChatGLM3) is served in this process by uvicorn on a free 127.0.0.1 port, its model
wrapped so that its logits write a chosen reply (as tests/test_chatglm3.py forces them), and
driven with the official openai client. The prompts the server reads are checked against
ChatGLM3Tokenizer.build_chat_input of the conversation expected from the OpenAI messages.
"""

import json
import threading
import time

import numpy as np
import pytest
from family_dirs import write_family_dir
from test_serve import Server, free_port

from glm_numpy import ChatGLM2, load_tokenizer
from glm_numpy.chatglm3 import tool_system_message

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from glm_numpy.serve import create_app  # noqa: E402  (after the skips)

USER, OBSERVATION = 64795, 64797
WEATHER = {
    "name": "get_weather",
    "description": "当前天气 / current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": WEATHER}]
CALL = 'get_weather\n```python\ntool_call(city="北京")\n```'


class Forced:
    """The tiny model run for real, its logits replaced to write the queued scripts (one id per
    forward pass whose logits the scheduler reads); records the ids each pass fed."""

    def __init__(self, model):
        self.model, self.config, self.scripts, self.fed = model, model.config, [], []

    def new_cache(self):
        return self.model.new_cache()

    def force(self, logits):  # logits [..., V]: the next id of the current script wins
        forced = np.zeros_like(logits)
        forced[..., self.scripts[0].pop(0)] = 30.0
        if not self.scripts[0]:
            self.scripts.pop(0)
        return forced

    def forward(self, ids, cache, last_only=False):
        self.fed.append([int(i) for i in ids])
        return self.force(self.model.forward(ids, cache, last_only=last_only))

    def forward_batch(self, ids, mask, caches, last_only=False):
        return self.force(self.model.forward_batch(ids, mask, caches, last_only=last_only))


@pytest.fixture(scope="module")
def directory(tmp_path_factory, real_tokenizer_path):
    return write_family_dir(tmp_path_factory.mktemp("serve3"), "chatglm3", real_tokenizer_path)


@pytest.fixture(scope="module")
def served(directory):
    """(openai client, the Forced model, the tokenizer) of a server running in this process."""
    tokenizer = load_tokenizer(directory)
    model = Forced(ChatGLM2.from_pretrained(directory))
    app = create_app(model, tokenizer, "tiny3", prefill_chunk=4096)  # a prompt in one pass
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    yield client, model, tokenizer
    server.should_exit = True
    thread.join(30)


def script(tokenizer, text, stop):
    return [*tokenizer.encode(text, add_special_tokens=False), stop]


def ask(served, reply, **request):
    """Send a chat request that the model answers with `reply` (its ids, stop id included);
    -> (the response or the stream's chunks, the prompt ids the server read)."""
    client, model, _ = served
    model.scripts.append(list(reply))
    fed_before = len(model.fed)
    response = client.chat.completions.create(model="tiny3", temperature=0, **request)
    if request.get("stream"):
        response = list(response)
    assert not model.scripts  # the reply was written whole, up to its stop id
    return response, model.fed[fed_before]


def test_tool_call_round_trip(served):
    _, _, tokenizer = served
    question = [
        {"role": "system", "content": "你会用工具。"},
        {"role": "user", "content": "北京天气怎么样？"},
    ]
    response, prompt = ask(
        served, script(tokenizer, CALL, OBSERVATION), messages=question, tools=TOOLS
    )
    opening = tool_system_message([WEATHER], "你会用工具。")  # the client's system text leads
    assert prompt == tokenizer.build_chat_input("北京天气怎么样？", [opening])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}

    result = json.dumps({"weather": "晴", "temperature": 22}, ensure_ascii=False)
    messages = [
        *question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = "北京今天晴，22度。"
    response, prompt = ask(
        served, script(tokenizer, "\n" + answer, USER), messages=messages, tools=TOOLS
    )
    history = [
        opening,
        {"role": "user", "content": "北京天气怎么样？"},
        {
            "role": "assistant",
            "metadata": "get_weather",
            "content": "```python\ntool_call(city='北京')\n```",
        },
    ]
    assert prompt == tokenizer.build_chat_input(result, history, role="observation")
    assert response.choices[0].message.content == answer
    assert response.choices[0].finish_reason == "stop"
    assert not response.choices[0].message.tool_calls


def test_a_streamed_tool_call_comes_in_one_chunk(served):
    _, _, tokenizer = served
    stream, _ = ask(
        served,
        script(tokenizer, CALL, OBSERVATION),
        messages=[{"role": "user", "content": "北京天气"}],
        tools=TOOLS,
        stream=True,
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    reasons = [chunk.choices[0].finish_reason for chunk in stream if chunk.choices]
    assert reasons[-1] == "tool_calls"
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1 and calls[0][0].function.name == "get_weather"
    assert json.loads(calls[0][0].function.arguments) == {"city": "北京"}
    assert not "".join(d.content or "" for d in deltas)


def test_stream_uses_the_chatglm3_template_without_tools(served):
    _, _, tokenizer = served
    messages = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "秋夜"}]
    stream, prompt = ask(
        served, script(tokenizer, "\n月光如水。\n夜深了。", USER), messages=messages, stream=True
    )
    assert prompt == tokenizer.build_chat_input("秋夜", [messages[0]])
    chunks = [chunk.choices[0] for chunk in stream if chunk.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "月光如水。\n夜深了。"
    assert chunks[-1].finish_reason == "stop"


def test_an_unreadable_tool_call_comes_back_as_text(served):
    _, _, tokenizer = served
    text = "get_weather\n```python\nweather of 北京\n```"
    response, _ = ask(
        served,
        script(tokenizer, text, OBSERVATION),
        messages=[{"role": "user", "content": "北京天气"}],
        tools=TOOLS,
    )
    assert response.choices[0].message.content == text
    assert response.choices[0].finish_reason == "stop"


def test_bad_tools_and_tool_calls_are_named(served):
    client = served[0]
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="tiny3", messages=[{"role": "user", "content": "x"}], tools=[{"type": "x"}]
        )
    bad_call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [bad_call]},
        {"role": "tool", "tool_call_id": "c", "content": "1"},
    ]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.tool_calls\[0\]"):
        client.chat.completions.create(model="tiny3", messages=messages)


def test_glm_numpy_serve_detects_chatglm3(directory):
    """The CLI reads the family from the directory at start-up and takes tools."""
    server = Server("--model", str(directory))
    try:
        assert server.health()["family"] == "chatglm3"
        response = server.client.chat.completions.create(
            model="tiny3", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, max_tokens=2
        )
        assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        assert server.stop()[0] == 0
