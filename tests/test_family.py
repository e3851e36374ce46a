"""Which model a directory holds (glm_numpy.family), load_tokenizer, and the CLI's --family:
a ChatGLM3 directory chats in ChatGLM3's format from Python and from the command line, and
CodeGeeX2 gets its code prompt."""

import shutil

import pytest
from family_dirs import TOKENIZER_CODE, write_family_dir

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer, ChatGLM3Tokenizer, load_tokenizer
from glm_numpy.cli import main, reply_to, show_history
from glm_numpy.family import FamilyError, detect_family
from glm_numpy.generation import GenerationConfig, chat, generate
from glm_numpy.testing import write_tiny_checkpoint

GREEDY = {"do_sample": False}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, real_tokenizer_path):
    root = tmp_path_factory.mktemp("families")
    return {
        family: write_family_dir(root / family, family, real_tokenizer_path)
        for family in ("chatglm2", "chatglm3", "codegeex2")
    }


def test_each_official_shape_is_recognised(dirs):
    assert {family: detect_family(d) for family, d in dirs.items()} == {
        "chatglm2": "chatglm2",
        "chatglm3": "chatglm3",
        "codegeex2": "codegeex2",
    }


@pytest.mark.parametrize(
    "only", ["tokenization_chatglm.py", "tokenizer_config.json", "config.json"]
)
def test_one_piece_of_chatglm3_evidence_is_enough(tmp_path, dirs, only):
    if only == "config.json":  # a fine-tune that keeps the official _name_or_path
        directory = write_tiny_checkpoint(tmp_path, _name_or_path="THUDM/chatglm3-6b-32k")
    else:
        directory = write_tiny_checkpoint(tmp_path, _name_or_path="/home/me/models/my-model")
        shutil.copy(dirs["chatglm3"] / only, directory / only)
    assert detect_family(directory) == "chatglm3"


def test_no_evidence_is_chatglm2_as_before(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, _name_or_path="my-model")
    assert detect_family(directory) == "chatglm2"


def test_disagreeing_files_are_an_error_naming_them(tmp_path, dirs):
    directory = shutil.copytree(dirs["chatglm2"], tmp_path / "mixed")
    (directory / "tokenization_chatglm.py").write_text(TOKENIZER_CODE["chatglm3"])
    with pytest.raises(FamilyError) as error:
        load_tokenizer(directory)
    message = str(error.value)
    assert "tokenization_chatglm.py defines the role tokens (chatglm3)" in message
    assert 'config.json _name_or_path "THUDM/chatglm2-6b" (chatglm2)' in message
    assert "--family" in message
    assert isinstance(load_tokenizer(directory, family="chatglm3"), ChatGLM3Tokenizer)
    with pytest.raises(FamilyError, match="family 'glm4': must be one of"):
        load_tokenizer(directory, family="glm4")


def test_load_tokenizer_gives_each_family_its_behaviour(dirs):
    tokenizers = {family: load_tokenizer(d) for family, d in dirs.items()}
    assert type(tokenizers["chatglm3"]) is ChatGLM3Tokenizer
    assert type(tokenizers["chatglm2"]) is type(tokenizers["codegeex2"]) is ChatGLM2Tokenizer
    assert type(load_tokenizer(dirs["chatglm3"], family="chatglm2")) is ChatGLM2Tokenizer


def test_a_chatglm3_directory_chats_in_its_format_from_python_and_the_cli(dirs, capsys):
    directory = dirs["chatglm3"]
    model, tokenizer = ChatGLM2.from_pretrained(directory), load_tokenizer(directory)
    args = ["--model", str(directory), "--greedy", "--max-new-tokens", "5"]
    assert main(["generate", "你好", "--chat-template", *args]) == 0
    response, history = chat(model, tokenizer, "你好", do_sample=False, max_new_tokens=5)
    assert capsys.readouterr().out == response + "\n"
    assert history[0] == {"role": "user", "content": "你好"}
    # the ids fed were ChatGLM3's: [gMASK] sop <|user|> \n 你好 <|assistant|>
    config = GenerationConfig(**GREEDY, max_new_tokens=5, stop_ids=tokenizer.stop_ids)
    ids = [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    assert tokenizer.decode(generate(model, ids, config)).strip() == response


def test_cli_chat_with_a_system_prompt(dirs, monkeypatch, capsys):
    answers = iter(["你好", "/history"])

    def user_types(prompt=""):
        print(prompt, end="")
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", user_types)
    args = ["--model", str(dirs["chatglm3"]), "--greedy", "--max-new-tokens", "4"]
    assert main(["chat", *args, "--system", "You are ChatGLM3."]) == 0
    out = capsys.readouterr().out
    assert "System: You are ChatGLM3.\nUser: 你好\nChatGLM: " in out


def test_cli_answers_a_tool_call_with_an_observation(monkeypatch, capsys):
    class Session:  # a ChatGLM3 session that calls a tool, then answers with its result
        def __init__(self):
            self.asked = []

        def stream(self, query, role="user"):
            self.asked.append((role, query))
            if role == "user":
                yield {"name": "get_weather", "parameters": {"city": "北京"}}
            else:
                yield "北京"
                yield "北京晴"

    session = Session()
    call = reply_to(session, "北京天气？")
    assert call == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert reply_to(session, '{"weather": "晴"}', role="observation") is None
    out = capsys.readouterr().out
    assert out == 'ChatGLM: [calls get_weather] {"city": "北京"}\nChatGLM: 北京晴\n'
    assert session.asked == [("user", "北京天气？"), ("observation", '{"weather": "晴"}')]
    show_history([
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\n...\n```"},
        {"role": "observation", "content": "晴"},
    ])  # fmt: skip
    assert "ChatGLM [get_weather]: ```python" in capsys.readouterr().out


def test_tools_file_and_system_prompt_are_checked(tmp_path, dirs, capsys):
    bad = tmp_path / "tools.json"
    bad.write_text('{"name": "not a list"}')
    assert main(["chat", "--model", str(dirs["chatglm3"]), "--tools", str(bad)]) == 2
    assert "expected a JSON list of tool descriptions" in capsys.readouterr().err
    assert main(["chat", "--model", str(dirs["chatglm2"]), "--system", "hi"]) == 2
    assert "--system and --tools need a ChatGLM3 model" in capsys.readouterr().err


def test_codegeex2_gets_its_code_prompt(dirs, capsys):
    directory = dirs["codegeex2"]
    prompt = "# write a bubble sort function\n"
    args = ["generate", prompt, "--model", str(directory), "--greedy", "--max-new-tokens", "6"]
    assert main([*args, "--language", "python"]) == 0
    model, tokenizer = ChatGLM2.from_pretrained(directory), load_tokenizer(directory)
    ids = tokenizer.encode("# language: Python\n" + prompt)
    expected = tokenizer.decode(generate(model, ids, GenerationConfig(**GREEDY, max_new_tokens=6)))
    assert capsys.readouterr().out == expected + "\n"
    # a ChatGLM2 directory needs --family codegeex2 for it; unknown languages are named
    assert main([*args[:3], str(dirs["chatglm2"]), "--language", "Python"]) == 2
    assert "--language writes CodeGeeX2's code prompt" in capsys.readouterr().err
    assert main([*args, "--language", "Brainfuck"]) == 2
    assert "'Brainfuck': CodeGeeX2 has no tag for it" in capsys.readouterr().err
    assert (
        main([*args[:3], str(dirs["chatglm2"]), "--family", "codegeex2", "--language", "c++"]) == 0
    )
