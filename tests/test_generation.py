"""Sampling chain, generation loops and chat (spec §4.3–§4.6)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer, ChatSession, GenerationConfig, KVCache
from glm_numpy.config import ChatGLM2Config
from glm_numpy.generation import (
    GenerationStats,
    apply_repetition_penalty,
    apply_temperature,
    chat,
    chat_input_ids,
    generate,
    generate_batch,
    generate_stream,
    guard_invalid_logits,
    next_token,
    process_response,
    softmax,
    stream_chat,
    top_k_filter,
    top_p_filter,
)
from glm_numpy.testing import write_tiny_checkpoint

GREEDY = {"do_sample": False}
LOGITS = arrays(np.float32, st.integers(2, 64), elements=st.floats(-20, 20, width=32), unique=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random model with the real vocabulary size, so real token ids fit."""
    directory = tmp_path_factory.mktemp("tiny65k")
    return ChatGLM2.from_pretrained(write_tiny_checkpoint(directory, padded_vocab_size=65024))


@pytest.fixture(scope="module")
def tokenizer(real_tokenizer_path):
    return ChatGLM2Tokenizer(real_tokenizer_path)


class ScriptedModel:
    """Stands in for ChatGLM2: whatever it is fed, it emits the next id of a fixed script and
    then </s>, so decoding and streaming can be tested on chosen tokens."""

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = ChatGLM2Config(seq_length=8192)  # generation reads the context limit

    def new_cache(self) -> KVCache:
        return KVCache(num_layers=1, num_kv_groups=1, head_dim=4)

    def forward(self, ids, cache, last_only=False):
        cache.extend(np.ones(len(ids), dtype=bool))
        target = self.script[self.calls] if self.calls < len(self.script) else 2
        self.calls += 1
        logits = np.zeros((1, self.vocab), dtype=np.float32)
        logits[0, target] = 30.0
        return logits


# ---------------------------------------------------------------------------- sampling chain
@given(LOGITS, st.integers(0, 2**32 - 1))
def test_top_k_1_equals_greedy(logits, seed):
    config = GenerationConfig(top_k=1, top_p=1.0, temperature=0.7)
    token = next_token(logits, [], config, np.random.default_rng(seed))
    assert token == next_token(logits, [], GenerationConfig(**GREEDY), None) == np.argmax(logits)


@given(LOGITS, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    filtered = top_p_filter(logits, p)
    kept = np.isfinite(filtered)
    probs = softmax(logits)
    assert np.array_equal(filtered[kept], logits[kept])
    assert probs[kept].sum() >= p - 1e-6  # the nucleus reaches p ...
    assert probs[kept].sum() - probs[kept].min() < p + 1e-6  # ... and no smaller one does
    if (~kept).any():  # ... and it is made of the most likely tokens
        assert logits[kept].min() > logits[~kept].max()


def test_top_p_example():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert np.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert np.isfinite(top_p_filter(logits, 0.3)).tolist() == [True, False, False, False]


def test_top_k_keeps_the_k_largest_and_ties():
    logits = np.array([1.0, 5.0, 3.0, 3.0, -2.0], dtype=np.float32)
    assert np.isfinite(top_k_filter(logits, 2)).tolist() == [False, True, True, True, False]
    assert np.array_equal(top_k_filter(logits, 0), logits)


@given(LOGITS, st.floats(0.05, 5.0))
def test_temperature_divides_the_logits(logits, temperature):
    scaled = apply_temperature(logits, temperature)
    np.testing.assert_allclose(scaled, logits / temperature, rtol=1e-6)
    # below 1 sharpens, above 1 flattens: the top probability moves accordingly
    top = softmax(logits).max()
    if temperature < 1:
        assert softmax(scaled).max() >= top - 1e-12
    else:
        assert softmax(scaled).max() <= top + 1e-12


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 4.0, 0.0, -1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 3, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 4.0, 0.0, -1.0]
    assert logits.tolist() == [2.0, -2.0, 4.0, 0.0, -1.0]  # the input is left alone


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_invalid_logits_force_token_5(bad):
    logits = np.linspace(-1, 1, 20).astype(np.float32)
    logits[11] = bad
    assert guard_invalid_logits(logits)[5] == 5e4
    assert next_token(logits, [], GenerationConfig(), np.random.default_rng(0)) == 5
    assert next_token(logits, [], GenerationConfig(**GREEDY), None) == 5


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0)
    rng = np.random.default_rng(0)
    counts = np.bincount([next_token(logits, [], config, rng) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.6, 0.3, 0.1], atol=0.03)


def test_vocab_limit_keeps_ids_without_text_out():
    logits = np.zeros(10, dtype=np.float32)
    logits[8] = 100.0
    assert next_token(logits, [], GenerationConfig(**GREEDY, vocab_limit=8), None) < 8


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0.0}, "temperature=0.0: must be > 0 when sampling"),
        ({"top_p": 0.0}, r"top_p=0.0: must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5: must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1: must be an integer >= 0"),
        ({"repetition_penalty": 0}, "repetition_penalty=0: must be > 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0: must be >= 1"),
    ],
)
def test_bad_generation_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**options)


def test_greedy_allows_any_temperature():
    assert GenerationConfig(do_sample=False, temperature=0.0).temperature == 0.0


# ---------------------------------------------------------------------------- generation loops
def test_fixed_seed_repeats(model):
    prompt = [64790, 64792, 100, 200, 300]
    config = GenerationConfig(temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=12, seed=7)
    first = generate(model, prompt, config)
    assert generate(model, prompt, config) == first
    assert len(first) == 12


def test_length_limits_count_the_prompt(model):
    prompt = [64790, 64792, 5, 6, 7]
    assert len(generate(model, prompt, GenerationConfig(**GREEDY, max_length=9))) <= 4
    with pytest.raises(ValueError, match="leaves no room for a new token within max_length=5"):
        generate(model, prompt, GenerationConfig(**GREEDY, max_length=5))


def test_stats_and_final_token_feeding():
    prompt = [64790, 64792, 11, 12]
    model = ScriptedModel([7, 8, 9, 10, 11, 12], vocab=100)
    cache, stats = model.new_cache(), GenerationStats()
    config = GenerationConfig(**GREEDY, max_new_tokens=4)
    out = list(generate_stream(model, prompt, config, cache, stats=stats, feed_final_token=True))
    assert out == [7, 8, 9, 10] and stats.stop_reason == "length"
    assert cache.length == len(prompt) + len(out)  # every generated token is in the cache
    assert (stats.prefill_tokens, stats.decode_tokens) == (4, 3)
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0

    cache, stats = model.new_cache(), GenerationStats()
    out = list(generate_stream(ScriptedModel([7], 100), prompt, config, cache, stats=stats))
    assert out == [7] and stats.stop_reason == "eos"
    assert cache.length == len(prompt) + 1  # </s> is never fed


def test_batch_greedy_rows_equal_single_generation(model):
    prompts = [[64790, 64792, 9, 8, 7, 6, 5], [64790, 64792, 42], [64790, 64792, 300, 301, 302]]
    config = GenerationConfig(**GREEDY, max_new_tokens=6)
    assert generate_batch(model, prompts, config) == [generate(model, p, config) for p in prompts]


# ---------------------------------------------------------------------------- chat
def test_streaming_never_shows_half_an_emoji(tokenizer):
    text = "  你好👋! Emoji 🎉🚀 and code `x*2`  [[训练时间]]"
    script = tokenizer.encode(text, add_special_tokens=False)
    model = ScriptedModel(script, tokenizer.vocab_size)
    partials = [r for r, _ in stream_chat(model, tokenizer, "hi", **GREEDY)]
    assert partials and not any(p.endswith("\ufffd") for p in partials)
    # the text only grows, until the final token completes the [[训练时间]] placeholder
    assert all(later.startswith(p) for p, later in zip(partials[:-2], partials[1:-1]))
    expected = "你好👋! Emoji 🎉🚀 and code `x*2`  2023年"
    assert partials[-1] == expected
    assert chat(ScriptedModel(script, tokenizer.vocab_size), tokenizer, "hi", **GREEDY) == (
        expected,
        [("hi", expected)],
    )


def test_stream_chat_ends_with_the_chat_response(model, tokenizer):
    options = {**GREEDY, "max_new_tokens": 5}
    history = [("你好", "你好👋!")]
    response, new_history = model.chat(tokenizer, "今天天气怎么样?", history, **options)
    *_, (last, last_history) = model.stream_chat(tokenizer, "今天天气怎么样?", history, **options)
    assert (last, last_history) == (response, new_history)
    assert new_history[:1] == history


def test_cache_reuse_and_re_encoding_give_the_same_next_token_logits(model, tokenizer):
    """Round 2 through the kept cache (only the new text fed) vs the whole prompt re-encoded,
    where both paths give the same token sequence."""
    history = [("What is 2+2?", "4")]
    full = tokenizer.build_chat_input("And 3+3?", history)  # the re-encode path
    round_1 = tokenizer.build_chat_input("What is 2+2?")
    response = tokenizer.encode("答：4", add_special_tokens=False)[3:]  # '4' as it follows '：'
    cache = model.new_cache()
    model.forward(np.array(round_1 + response), cache)  # what round 1 left in the cache
    new_round = chat_input_ids(tokenizer, "And 3+3?", history, cache)
    assert round_1 + response + new_round == full  # same token sequence on both paths
    via_cache = model.forward(np.array(new_round), cache, last_only=True)[-1]
    re_encoded = model.forward(np.array(full), last_only=True)[-1]
    np.testing.assert_allclose(via_cache, re_encoded, rtol=1e-4, atol=1e-4)

    # and the whole round: stream_chat on the cache == chat() on the re-encoded prompt
    cache = model.new_cache()
    model.forward(np.array(round_1 + response), cache)
    options = {**GREEDY, "max_new_tokens": 4}
    *_, (streamed, _, kept) = stream_chat(
        model, tokenizer, "And 3+3?", history, cache, return_past_key_values=True, **options
    )
    assert kept is cache
    assert streamed == chat(model, tokenizer, "And 3+3?", history, **options)[0]


def test_stream_chat_leaves_the_round_in_the_cache(model, tokenizer):
    options = {**GREEDY, "max_new_tokens": 3}
    round_1 = tokenizer.build_chat_input("hi")
    generated = generate(model, round_1, GenerationConfig(**options, vocab_limit=64794))
    *_, (response, history, cache) = stream_chat(
        model, tokenizer, "hi", return_past_key_values=True, **options
    )
    assert cache.length == len(round_1) + len(generated)  # prompt + reply, no </s>
    next_round = chat_input_ids(tokenizer, "again", history, cache)
    np.testing.assert_allclose(
        model.forward(np.array(next_round), cache, last_only=True)[-1],
        model.forward(np.array(round_1 + generated + next_round), last_only=True)[-1],
        rtol=1e-4,
        atol=1e-4,
    )


def test_non_empty_cache_needs_its_history(model, tokenizer):
    cache = model.new_cache()
    model.forward(np.array([64790, 64792, 5]), cache)
    with pytest.raises(ValueError, match="needs the history"):
        next(stream_chat(model, tokenizer, "q", [], cache, **GREEDY))


def test_chat_session_keeps_the_cache_and_survives_an_interrupted_reply(model, tokenizer):
    session = ChatSession(model, tokenizer, **GREEDY, max_new_tokens=4)
    first = session.ask("你好")
    assert session.history == [("你好", first)] and session.cache is not None

    stream = session.stream("Tell me more")
    partial = next(stream, "")
    stream.close()  # the user pressed Ctrl-C
    assert session.history[-1] == ("Tell me more", partial) and session.cache is None

    third = session.ask("OK")  # re-encodes the whole history
    expected, _ = chat(model, tokenizer, "OK", session.history[:2], **GREEDY, max_new_tokens=4)
    assert third == expected
    session.clear()
    assert session.history == [] and session.cache is None


def test_process_response():
    assert process_response("  我在[[训练时间]]训练。\n") == "我在2023年训练。"
    assert process_response("a [[训练时间]] b [[训练时间]]") == "a 2023年 b 2023年"
