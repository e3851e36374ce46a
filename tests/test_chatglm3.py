"""ChatGLM3's tokenizer behaviour, chat format and tool calls (glm_numpy.chatglm3) with the real
tokenizer.model. Expected ids are built from the rules with SentencePiece itself: the role
token, sp(metadata + "\\n"), sp(content), after [gMASK] sop, ending with <|assistant|>."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatSession, TokenizerError
from glm_numpy.chatglm3 import ToolCallError, parse_tool_call, process_response
from glm_numpy.generation import GenerationConfig, chat, generate, stream_chat
from glm_numpy.testing import write_tiny_checkpoint

GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION = 64790, 64792, 64794, 64795, 64796, 64797
GREEDY = {"do_sample": False}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "当前天气 / current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_path):
    return ChatGLM3Tokenizer(real_tokenizer_path)


@pytest.fixture(scope="module")
def sp(real_tokenizer_path):
    processor = spm.SentencePieceProcessor()
    processor.Load(str(real_tokenizer_path))
    return processor.EncodeAsIds


def message(sp, role_id, content, metadata=""):
    return [role_id, *sp(f"{metadata}\n"), *sp(content)]


def test_role_tokens_follow_chatglm2s_five_specials(tokenizer):
    assert tokenizer.sp.GetPieceSize() == 64789
    roles = {k: v for k, v in tokenizer.special_ids.items() if k.startswith("<|")}
    assert roles == {
        "<|system|>": SYSTEM,
        "<|user|>": USER,
        "<|assistant|>": ASSISTANT,
        "<|observation|>": OBSERVATION,
    }
    assert tokenizer.vocab_size == 64798 and tokenizer.stop_ids == (2, USER, OBSERVATION)
    # everything else is ChatGLM2's
    chatglm2 = ChatGLM2Tokenizer(tokenizer.path)
    assert tokenizer.encode("你好, ChatGLM3!") == chatglm2.encode("你好, ChatGLM3!")
    assert tokenizer.encode("<|user|>", add_special_tokens=False) == chatglm2.encode(
        "<|user|>", add_special_tokens=False
    )  # a role token typed as text is text


def test_a_first_question(tokenizer):
    # the well-known ChatGLM3 input for 你好
    assert tokenizer.build_chat_input("你好") == [
        GMASK, SOP, USER, 30910, 13, 36474, 54591, ASSISTANT
    ]  # fmt: skip


def test_system_prompt_and_several_rounds(tokenizer, sp):
    history = [
        {"role": "system", "content": "You are ChatGLM3, a helpful assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好👋！有什么可以帮你？"},
    ]
    expected = [
        GMASK, SOP,
        *message(sp, SYSTEM, "You are ChatGLM3, a helpful assistant."),
        *message(sp, USER, "你好"),
        *message(sp, ASSISTANT, "你好👋！有什么可以帮你？"),
        *message(sp, USER, "1+1=?"),
        ASSISTANT,
    ]  # fmt: skip
    assert tokenizer.build_chat_input("1+1=?", history) == expected


def test_metadata_and_tools(tokenizer, sp):
    system = (
        "Answer the following questions as best as you can. You have access to the following tools:"
    )
    call = '```python\ntool_call(city="北京")\n```'
    history = [
        {"role": "system", "content": system, "tools": [WEATHER_TOOL]},
        {"role": "user", "content": "北京天气怎么样？"},
        {"role": "assistant", "metadata": "get_weather", "content": call},
    ]
    tools_json = json.dumps([WEATHER_TOOL], indent=4, ensure_ascii=False)
    expected = [
        GMASK, SOP,
        *message(sp, SYSTEM, system + "\n" + tools_json),
        *message(sp, USER, "北京天气怎么样？"),
        *message(sp, ASSISTANT, call, metadata="get_weather"),
        *message(sp, OBSERVATION, '{"temperature": 22}'),
        ASSISTANT,
    ]  # fmt: skip
    assert (
        tokenizer.build_chat_input('{"temperature": 22}', history, role="observation") == expected
    )
    assert '"当前天气 / current weather of a city"' in tokenizer.decode(expected)  # not escaped


def test_decoding_writes_role_tokens_as_text(tokenizer):
    ids = tokenizer.build_chat_input("Hello", [{"role": "system", "content": "Be brief."}])
    # the official chat_template (tokenizer_config.json) renders the same conversation so
    assert tokenizer.decode(ids) == "[gMASK]sop<|system|>\n Be brief.<|user|>\n Hello<|assistant|>"
    assert tokenizer.decode([2, 0, *ids[-3:]]) == "\n Hello<|assistant|>"  # </s>, <unk>: nothing
    assert tokenizer.pieces([USER, OBSERVATION]) == ["<|user|>", "<|observation|>"]
    with pytest.raises(TokenizerError, match="token id 64798 has no text"):
        tokenizer.decode([64798])


@pytest.mark.parametrize(
    "history, message_text",
    [
        ([{"role": "robot", "content": "hi"}], r"history\[0\]: role 'robot'"),
        ([("你好", "hi")], r"history\[0\]: expected a message"),
        ([{"role": "user"}], r"history\[0\]: expected a message"),
    ],
)
def test_bad_history_is_named(tokenizer, history, message_text):
    with pytest.raises(TokenizerError, match=message_text):
        tokenizer.build_chat_input("hi", history)
    with pytest.raises(TokenizerError, match="a user message must be text, got NoneType"):
        tokenizer.build_chat_input(None)


def test_process_response_text_and_segments():
    history = [{"role": "user", "content": "hi"}]
    response, turn = process_response("\n 训练于[[训练时间]]。 ", history)
    assert response == "训练于2023年。"
    assert turn[-1] == {"role": "assistant", "metadata": "", "content": "训练于[[训练时间]]。"}
    response, turn = process_response("\nLet me look.<|assistant|>search\nquery text", history)
    assert response == {"name": "search", "content": "query text"}  # no tools offered
    assert [m["metadata"] for m in turn[1:]] == ["", "search"]
    assert history == [{"role": "user", "content": "hi"}]  # the caller's list is left alone


def test_the_tool_calling_example_of_chatglm3s_prompt_doc():
    # THUDM/ChatGLM3 PROMPT_en.md: some text, then a second <|assistant|> segment with the call
    reply = (
        "\nOkay, let's look up the weather in Bejing today.<|assistant|>get_current_weather\n"
        '```python\ntool_call(location="beijing", unit="celsius")\n```'
    )
    offered = [{"role": "system", "content": "…", "tools": [WEATHER_TOOL]}]
    response, turn = process_response(reply, offered + [{"role": "user", "content": "Weather?"}])
    assert response == {
        "name": "get_current_weather",
        "parameters": {"location": "beijing", "unit": "celsius"},
    }
    assert [(m["role"], m["metadata"]) for m in turn[2:]] == [
        ("assistant", ""),
        ("assistant", "get_current_weather"),
    ]


def test_tool_calls_are_parsed_never_evaluated():
    block = '```python\ntool_call(city="北京", days=3, detail={"wind": True}, tags=[1, 2.5])\n```'
    assert parse_tool_call(block) == {
        "city": "北京",
        "days": 3,
        "detail": {"wind": True},
        "tags": [1, 2.5],
    }
    for bad in (
        '```python\n__import__("os").system("echo pwned")\n```',
        "```python\ntool_call(city=open('/etc/passwd').read())\n```",
        "```python\ntool_call('positional')\n```",
        "```python\ntool_call(**spec)\n```",
        '```python\ntool_call(city="北\n```',  # still being written
    ):
        with pytest.raises(ToolCallError, match="tool call 'get_weather'"):
            parse_tool_call(bad, "get_weather")


# ---------------------------------------------------------------- generation with forced logits
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint with the real vocabulary size, so real token ids fit."""
    return ChatGLM2.from_pretrained(
        write_tiny_checkpoint(tmp_path_factory.mktemp("tiny3"), padded_vocab_size=65024)
    )


class Forced:
    """The tiny model run for real (its KV cache fills), with its logits replaced so that it
    writes a chosen reply: each round's script, one id per forward pass."""

    def __init__(self, model, *rounds):
        self.model, self.rounds, self.fed = model, [list(r) for r in rounds], []
        self.config = model.config  # generation keeps within its seq_length

    def new_cache(self):
        return self.model.new_cache()

    def forward(self, ids, cache, last_only=False):
        self.fed.append([int(i) for i in ids])
        real = self.model.forward(ids, cache, last_only=last_only)
        forced = np.zeros_like(real)
        forced[-1, self.rounds[0].pop(0)] = 30.0
        if not self.rounds[0]:
            self.rounds.pop(0)
        return forced


def reply_ids(tokenizer, text, stop):
    return [*tokenizer.encode(text, add_special_tokens=False), stop]


@pytest.mark.parametrize("stop", [2, USER, OBSERVATION])
def test_generation_stops_on_role_tokens(tiny, tokenizer, stop):
    script = [*tokenizer.encode("\nok", add_special_tokens=False), stop, 100, 101]
    config = GenerationConfig(**GREEDY, stop_ids=tokenizer.stop_ids)
    assert generate(Forced(tiny, script), [GMASK, SOP], config) == script[: script.index(stop)]
    response, history = chat(Forced(tiny, script), tokenizer, "hi", **GREEDY)
    assert response == "ok" and history[-1]["content"] == "ok"


def test_tool_call_round_trip(tiny, tokenizer, sp):
    call = '```python\ntool_call(city="北京")\n```'
    model = Forced(
        tiny,
        reply_ids(tokenizer, "get_weather\n" + call, OBSERVATION),
        reply_ids(tokenizer, "\n北京今天晴，22度。", USER),
    )
    session = ChatSession(model, tokenizer, tools=[WEATHER_TOOL], **GREEDY)
    assert session.ask("北京天气怎么样？") == {
        "name": "get_weather",
        "parameters": {"city": "北京"},
    }
    first_round = session.history[:2]
    assert model.fed[0] == tokenizer.build_chat_input("北京天气怎么样？", first_round[:1])
    assert session.history[-1] == {"role": "assistant", "metadata": "get_weather", "content": call}
    assert session.cache.length == sum(map(len, model.fed))  # everything but <|observation|>

    result = json.dumps({"weather": "晴", "temperature": 22}, ensure_ascii=False)
    assert session.ask(result, role="observation") == "北京今天晴，22度。"
    # the second round feeds only the observation and <|assistant|>, after the cached call
    fed_round_two = model.fed[
        len(model.fed) - len(reply_ids(tokenizer, "\n北京今天晴，22度。", 0)) :
    ]
    assert fed_round_two[0] == [*message(sp, OBSERVATION, result), ASSISTANT]
    assert [m["role"] for m in session.history] == [
        "system", "user", "assistant", "observation", "assistant"
    ]  # fmt: skip
    session.clear()
    assert session.history == [session.opening[0]] and session.opening[0]["tools"] == [WEATHER_TOOL]


def test_stream_chat_yields_a_tool_call_once_it_can_be_read(tiny, tokenizer):
    call = '```python\ntool_call(city="北京")\n```'
    model = Forced(tiny, reply_ids(tokenizer, "get_weather\n" + call, OBSERVATION))
    history = [{"role": "system", "content": "Use tools.", "tools": [WEATHER_TOOL]}]
    responses = [r for r, _ in stream_chat(model, tokenizer, "北京天气", history, **GREEDY)]
    assert responses and all(isinstance(r, dict) for r in responses)
    assert responses[-1] == {"name": "get_weather", "parameters": {"city": "北京"}}
    broken = Forced(
        tiny, reply_ids(tokenizer, "get_weather\n```python\nrm -rf /\n```", OBSERVATION)
    )
    with pytest.raises(ToolCallError, match="tool call 'get_weather'"):
        list(stream_chat(broken, tokenizer, "北京天气", history, **GREEDY))


def test_cached_rounds_continue_with_the_next_role_token(tiny, tokenizer):
    model = Forced(
        tiny,
        reply_ids(tokenizer, "\n你好！", USER),
        reply_ids(tokenizer, "\n2", USER),
    )
    session = ChatSession(model, tokenizer, system="You are ChatGLM3.", **GREEDY)
    assert session.ask("你好") == "你好！"
    fed_before = len(model.fed)
    assert session.ask("1+1=?") == "2"
    assert model.fed[fed_before] == tokenizer.continuation_ids("1+1=?")  # no [gMASK] sop again
    assert session.history[0] == {"role": "system", "content": "You are ChatGLM3."}


def test_chatglm2_has_no_roles_or_system_prompt(tiny, real_tokenizer_path):
    chatglm2 = ChatGLM2Tokenizer(real_tokenizer_path)
    with pytest.raises(ValueError, match="ChatGLM2 has no roles"):
        chat(tiny, chatglm2, "hi", role="observation")
    with pytest.raises(ValueError, match="need a ChatGLM3 model"):
        ChatSession(tiny, chatglm2, system="You are ChatGLM2.")
