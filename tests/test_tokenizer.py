"""ChatGLM2Tokenizer and the chat prompt against the real tokenizer.model (spec §4.4, §5)."""

import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy import ChatGLM2Tokenizer, TokenizerError, build_prompt
from glm_numpy.tokenizer import continuation_prompt, left_pad


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_path):
    return ChatGLM2Tokenizer(real_tokenizer_path)


# spec §5.3 test vectors (without the two prefix ids)
SPEC_VECTORS = {
    "你好, ChatGLM2!": [36474, 54591, 30932, 22011, 10461, 30944, 30943, 30992],
    "你好": [36474, 54591],
    "Hello world": [13755, 993],
    "2023年7月": [30910, 30943, 30940, 30943, 30966, 54540, 30981, 54595],
    "晚上睡不着应该怎么办": [30910, 32820, 54266, 31876, 35153],
    "def f(x):\n    return x*2": [884, 279, 30946, 30948, 1528, 13, 296, 3793, 1994, 30998, 30943],
    "  lead": [265, 1101],
    "你好👋!": [36474, 54591, 243, 162, 148, 142, 30992],
}


@pytest.mark.parametrize("text, ids", SPEC_VECTORS.items())
def test_spec_vectors(tokenizer, text, ids):
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert tokenizer.encode(text) == [64790, 64792, *ids]


def test_special_ids_follow_the_sentencepiece_vocabulary(tokenizer):
    assert tokenizer.special_ids == {
        "[MASK]": 64789,
        "[gMASK]": 64790,
        "[sMASK]": 64791,
        "sop": 64792,
        "eop": 64793,
    }
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (64794, 2, 0)


def test_special_token_strings_in_text_are_ordinary_text(tokenizer):
    assert tokenizer.encode("你好</s>") == [64790, 64792, 36474, 54591, 1833, 30917, 30994]
    assert 64790 not in tokenizer.encode("[gMASK]", add_special_tokens=False)


def test_single_turn_prompt_ids(tokenizer):
    """spec §4.4: the single-turn prompt for "你好", and its pieces."""
    ids = tokenizer.build_chat_input("你好")
    assert ids == [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211,
                   39701, 13, 13, 55437, 31211]  # fmt: skip
    assert tokenizer.pieces(ids) == ["[gMASK]", "sop", "▁[", "R", "ound", "▁", "1", "]",
                                     "<0x0A>", "<0x0A>", "问", "：", "你好", "<0x0A>", "<0x0A>",
                                     "答", "："]  # fmt: skip


def test_prompt_template_multi_round():
    history = [("q1", "r1"), ("q2", "r2")]
    assert build_prompt("q3", history) == (
        "[Round 1]\n\n问：q1\n\n答：r1\n\n"
        "[Round 2]\n\n问：q2\n\n答：r2\n\n"
        "[Round 3]\n\n问：q3\n\n答："
    )
    assert build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert build_prompt("q", []) == build_prompt("q", None)
    assert "\uff1a" in build_prompt("q") and not build_prompt("q").endswith((" ", "\n"))


def test_continuation_prompt_completes_the_full_prompt():
    """Round k's full prompt = round k-1's prompt + response + the continuation text."""
    history = [("q1", "r1"), ("q2", "r2")]
    previous = build_prompt("q2", history[:1]) + "r2"
    assert previous + continuation_prompt("q3", history) == build_prompt("q3", history)


def test_continuation_drops_only_the_dummy_prefix_piece(tokenizer):
    ids = tokenizer.encode(continuation_prompt("hi", [("a", "b")]), add_special_tokens=False)
    assert ids[:3] == [30910, 13, 13]  # '▁' then two line feeds, spec §4.5


MIXED = st.lists(
    st.sampled_from(
        [
            "你好",
            "世界",
            " Hello",
            "world",
            "def f(x):\n\treturn x*2",
            "👋",
            "🎉🚀",
            "  ",
            "\n",
            "2023年",
            "naïve café",
            "ℂ",
            "{}[]()<>",
            "é",
        ]
    ),
    min_size=1,
    max_size=8,
).map("".join)


@given(MIXED)
def test_round_trip_of_mixed_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_decode_drops_special_and_control_ids(tokenizer):
    ids = [64790, 64792, 36474, 0, 54591, 1, 64789, 64791, 64793, 2]
    assert tokenizer.decode(ids) == "你好"
    assert tokenizer.decode([]) == ""


@pytest.mark.parametrize("bad", [64794, 65023, 70000, -1])
def test_decode_refuses_ids_without_text(tokenizer, bad):
    with pytest.raises(TokenizerError, match=f"token id {bad} has no text"):
        tokenizer.decode([36474, bad])


def test_incomplete_emoji_decodes_to_replacement_character(tokenizer):
    ids = tokenizer.encode("你好👋!", add_special_tokens=False)
    assert tokenizer.decode(ids[:4]).endswith("\ufffd")
    assert tokenizer.decode(ids[:6]) == "你好👋"


def test_batch_encode_pads_on_the_left(tokenizer):
    batch = tokenizer.batch_encode(["你好", "Hello world, ChatGLM2"])
    long = tokenizer.encode("Hello world, ChatGLM2")
    short = tokenizer.encode("你好")
    pad = len(long) - len(short)
    assert batch.input_ids.tolist() == [[0] * pad + short, long]
    assert batch.attention_mask.tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]
    assert batch.position_ids.tolist() == [
        [0] * pad + list(range(len(short))),
        list(range(len(long))),
    ]


def test_left_pad_refuses_empty_rows():
    with pytest.raises(ValueError, match="no empty list"):
        left_pad([[1, 2], []])
    assert left_pad([[7]]).input_ids.dtype == np.int64


def test_from_pretrained_reads_the_directory(tmp_path, real_tokenizer_path):
    with pytest.raises(TokenizerError, match="no tokenizer.model in this directory"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
    shutil.copy(real_tokenizer_path, tmp_path / "tokenizer.model")
    assert ChatGLM2Tokenizer.from_pretrained(tmp_path).encode("你好")[-2:] == [36474, 54591]


def test_unreadable_tokenizer_file_gets_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        ChatGLM2Tokenizer(bad)
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        ChatGLM2Tokenizer(tmp_path / "missing.model")
