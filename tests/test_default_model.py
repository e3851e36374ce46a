"""The embedded default model (glm_numpy/assets/default_model): loads like a real checkpoint,
tokenizes like the real tokenizer, generates reproducibly, and still models held-out text.

The held-out passages in tests/data/default_model_heldout.json (from Julius Caesar and from Tang
poems) were kept out of training by training/prepare_corpus.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from glm_numpy import ChatGLM2, ChatGLM2Config, ChatGLM2Tokenizer
from glm_numpy.assets import default_model_path
from glm_numpy.generation import GenerationConfig, GenerationStats, generate_stream
from glm_numpy.perplexity import token_nll

HELDOUT = Path(__file__).parent / "data" / "default_model_heldout.json"
# Regression limits: the shipped model scores 3.68 (en) and 53.1 (zh) per character on these
# passages (3.56 and 65.8 on the whole held-out set, MODEL_CARD.md); the limits leave 3 % or more
# for platform rounding (glm_numpy and torch agree to 1e-5) and fail for the previous models on
# Chinese (61.5 here before the last training phase, 70.4 before the Complete Tang Poems were
# added, 85.5 for the two-phase model; English moved less: 3.56, 3.66 and 3.81).
LIMITS = {"en": 3.8, "zh": 55.5}
OFFICIAL_KEYS = {
    "_name_or_path", "model_type", "architectures", "auto_map", "add_bias_linear",
    "add_qkv_bias", "apply_query_key_layer_scaling", "apply_residual_connection_post_layernorm",
    "attention_dropout", "attention_softmax_in_fp32", "bias_dropout_fusion", "ffn_hidden_size",
    "fp32_residual_connection", "hidden_dropout", "hidden_size", "kv_channels",
    "layernorm_epsilon", "multi_query_attention", "multi_query_group_num",
    "num_attention_heads", "num_layers", "original_rope", "padded_vocab_size",
    "post_layer_norm", "rmsnorm", "seq_length", "use_cache", "torch_dtype",
    "transformers_version", "tie_word_embeddings", "eos_token_id", "pad_token_id",
}  # fmt: skip


@pytest.fixture(scope="module")
def model() -> ChatGLM2:
    return ChatGLM2.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tokenizer() -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer.from_pretrained(default_model_path())


def test_files_and_config():
    directory = default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.model", "MODEL_CARD.md"):
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert set(raw) == OFFICIAL_KEYS
    config = ChatGLM2Config.from_json(directory)  # validates
    assert config.multi_query_attention and config.num_kv_groups == 2
    assert config.torch_dtype == "float16" and not config.tie_word_embeddings


def test_loads_like_a_real_checkpoint(model):
    c = model.config
    emb = model.weights["transformer.embedding.word_embeddings.weight"]
    assert emb.shape == (c.padded_vocab_size, c.hidden_size) and emb.dtype == np.float16
    inv_freq = model.weights["transformer.rotary_pos_emb.inv_freq"]
    assert inv_freq.shape == (c.kv_channels // 4,)
    assert len(model.weights) == 2 + 7 * c.num_layers + 2


def test_tokenizer_matches_the_real_layout(model, tokenizer):
    n = tokenizer.sp.GetPieceSize()
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert tokenizer.special_ids == {name: n + i for i, name in enumerate(names)}
    assert tokenizer.vocab_size == n + 5 <= model.config.padded_vocab_size
    assert [tokenizer.sp.IdToPiece(i) for i in (0, 1, 2, 3, 13, 258)] == [
        "<unk>", "<s>", "</s>", "<0x00>", "<0x0A>", "<0xFF>",
    ]  # fmt: skip
    assert tokenizer.encode("To be")[:2] == [n + 1, n + 3]
    assert tokenizer.pieces(tokenizer.encode("2023", add_special_tokens=False)) == [
        "▁", "2", "0", "2", "3",
    ]  # fmt: skip


def test_sampled_chat_is_deterministic_with_a_seed(model, tokenizer):
    options = {"seed": 7, "max_new_tokens": 24}
    first, _ = model.chat(tokenizer, "春望", **options)
    second, _ = model.chat(tokenizer, "春望", **options)
    assert first == second and first


@pytest.mark.parametrize("prompt", ["To be, or not to be", "[Round 1]\n\n问：秋夜\n\n答："])
def test_greedy_output_decodes_and_stops(model, tokenizer, prompt):
    config = GenerationConfig(do_sample=False, max_new_tokens=48, vocab_limit=tokenizer.vocab_size)
    stats = GenerationStats()
    ids = list(generate_stream(model, tokenizer.encode(prompt), config, stats=stats))
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    text = tokenizer.decode(ids)
    assert text.strip() and "\ufffd" not in text
    assert stats.stop_reason == "eos" or (stats.stop_reason == "length" and len(ids) == 48)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_heldout_perplexity_does_not_regress(model, tokenizer, lang):
    texts = json.loads(HELDOUT.read_text(encoding="utf-8"))[lang]
    total = 0.0
    for text in texts:
        ids = np.array(tokenizer.encode(text))  # [gMASK] sop, then the text
        total += token_nll(model.forward(ids)[1:-1], ids[2:]).sum()
    per_char = math.exp(total / sum(len(t) for t in texts))
    assert per_char <= LIMITS[lang]
