"""GGUF export: the file's contents (gguf's reader), and a round trip through llama.cpp.

The round-trip tests run llama.cpp through llama-cpp-python (the ``llamacpp`` extra, which CI
installs) and skip cleanly where it is not installed.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer, default_model_path  # noqa: E402
from glm_numpy.checkpoint import CheckpointError  # noqa: E402
from glm_numpy.checkpoint.quantize import quantize_checkpoint  # noqa: E402
from glm_numpy.cli import main  # noqa: E402
from glm_numpy.dtypes import to_float32  # noqa: E402
from glm_numpy.export import write_gguf  # noqa: E402
from glm_numpy.testing import write_tiny_checkpoint  # noqa: E402

DEFAULT_TOKENIZER = default_model_path() / "tokenizer.model"
LAYER0 = "transformer.encoder.layers.0."

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界。今天天气很好，我们去公园散步吧！",
    "emoji 😀🎉👍🏽 and 🇨🇳 flags",
    "  two leading spaces, two  inner,\ttab\nnewline\n\n\nthree, trailing  ",
    " ",
    "\n",
    "byte fallback: 𠀀𪚥 \x01\x7f ￿ ｆｕｌｌ",
    "special-looking text: [gMASK]sop </s> <s> <unk> [MASK] eop Aesop's sop stop",
    "混合 mixed 文本 with numbers 12345 and 3.14159",
]


def tiny_with_tokenizer(directory: Path, tokenizer: Path, vocab: int, **overrides) -> Path:
    """A tiny random checkpoint whose embedding has room for ``tokenizer``'s ids."""
    path = write_tiny_checkpoint(directory, padded_vocab_size=vocab, **overrides)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    return tiny_with_tokenizer(root / "tiny", DEFAULT_TOKENIZER, 8064, dtype="float16")


@pytest.fixture(scope="module")
def tiny_files(tiny, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-files")
    return {t: write_gguf(tiny, root / f"{t}.gguf", t, progress=False) for t in ("f16", "q8_0")}


# --- the file ------------------------------------------------------------------------------


def fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def test_f16_file_holds_the_weights_under_llamacpp_names(tiny, tiny_files):
    from glm_numpy.checkpoint import load_checkpoint

    reader = gguf.GGUFReader(tiny_files["f16"])
    tensors = {t.name: t for t in reader.tensors}
    checkpoint = load_checkpoint(tiny)
    pairs = {
        "token_embd.weight": "transformer.embedding.word_embeddings.weight",
        "blk.0.attn_qkv.weight": LAYER0 + "self_attention.query_key_value.weight",
        "blk.0.attn_qkv.bias": LAYER0 + "self_attention.query_key_value.bias",
        "blk.1.ffn_up.weight": "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
        "blk.1.ffn_down.weight": "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
        "output_norm.weight": "transformer.encoder.final_layernorm.weight",
        "output.weight": "transformer.output_layer.weight",
    }
    for gguf_name, name in pairs.items():
        stored = np.asarray(tensors[gguf_name].data).reshape(checkpoint[name].shape)
        np.testing.assert_array_equal(to_float32(stored), to_float32(checkpoint[name]))
    assert len(tensors) == 3 + 7 * 2  # inv_freq is not written: llama.cpp derives it
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    values = fields(reader)
    assert values["general.architecture"] == "chatglm"
    assert values["chatglm.block_count"] == 2
    assert values["chatglm.attention.head_count_kv"] == 2
    assert values["chatglm.rope.dimension_count"] == 8  # half of Dh = 16
    assert values["chatglm.feed_forward_length"] == 96
    assert values["tokenizer.ggml.add_bos_token"] is False


def test_vocabulary_covers_the_embedding_with_special_tokens(tiny_files):
    values = fields(gguf.GGUFReader(tiny_files["f16"]))
    tokens, types = values["tokenizer.ggml.tokens"], values["tokenizer.ggml.token_type"]
    tokenizer = ChatGLM2Tokenizer(DEFAULT_TOKENIZER)
    assert len(tokens) == 8064
    # "sop"/"eop" become "<sop>"/"<eop>": "s" + "op" would merge into a token named "sop"
    names = {"[MASK]": "[MASK]", "[gMASK]": "[gMASK]", "[sMASK]": "[sMASK]", "sop": "<sop>"}
    for name, token_id in tokenizer.special_ids.items():
        assert (tokens[token_id], types[token_id]) == (names.get(name, "<eop>"), 3)  # CONTROL
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>" and types[3] == 6
    assert tokens[-1] == "[PAD8063]" and types[-1] == 5  # UNUSED: rows the tokenizer never uses
    assert values["tokenizer.ggml.scores"][500] == pytest.approx(tokenizer.sp.GetScore(500))
    assert values["tokenizer.ggml.eos_token_id"] == 2


def test_q8_0_file_dequantises_close_to_the_weights(tiny, tiny_files):
    from glm_numpy.checkpoint import load_checkpoint

    reader = gguf.GGUFReader(tiny_files["q8_0"])
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = to_float32(load_checkpoint(tiny)[LAYER0 + "self_attention.query_key_value.weight"])
    restored = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
    assert np.abs(restored - weight).max() <= np.abs(weight).max() / 127


def test_bin_and_safetensors_sources_give_the_same_file(tmp_path):
    files = []
    for fmt in ("bin", "safetensors"):
        source = tiny_with_tokenizer(tmp_path / fmt, DEFAULT_TOKENIZER, 8064, fmt=fmt)
        files.append(write_gguf(source, tmp_path / f"{fmt}.gguf", "q4_0", progress=False))
    left, right = (gguf.GGUFReader(f).tensors for f in files)
    for x, y in zip(left, right, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(np.asarray(x.data), np.asarray(y.data))


def test_bf16_source_is_written_f16(tmp_path):
    from glm_numpy.checkpoint import load_checkpoint

    source = tiny_with_tokenizer(tmp_path / "bf16", DEFAULT_TOKENIZER, 8064, dtype="bfloat16")
    path = write_gguf(source, tmp_path / "m.gguf", progress=False)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    weight = load_checkpoint(source)["transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F16
    expected = to_float32(weight).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(weight.shape), expected)


def test_refuses_quantised_sources_existing_files_and_bad_types(tiny, tmp_path):
    quantized = quantize_checkpoint(tiny, tmp_path / "int8", bits=8, progress=False)
    with pytest.raises(CheckpointError, match="export from the 16-bit checkpoint"):
        write_gguf(quantized, tmp_path / "a.gguf", progress=False)
    existing = tmp_path / "b.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        write_gguf(tiny, existing, progress=False)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="q4_0"):
        write_gguf(tiny, tmp_path / "c.gguf", type="q5_k", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "int8"]


def test_a_failure_while_writing_leaves_no_file_behind(tiny, tmp_path, monkeypatch):
    import glm_numpy.export.gguf as export

    written = []

    def fail_on_the_fifth(array, ggml_type):
        written.append(array.shape)
        if len(written) == 5:
            raise KeyboardInterrupt  # Ctrl-C halfway through the tensors
        return stored(array, ggml_type)

    stored = export._stored
    monkeypatch.setattr(export, "_stored", fail_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(tiny, tmp_path / "x.gguf", progress=False)
    assert len(written) == 5 and list(tmp_path.iterdir()) == []


def test_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path, real_tokenizer_path):
    source = write_tiny_checkpoint(tmp_path / "tiny")  # V = 1024 < 64794 ids
    with pytest.raises(CheckpointError, match="does not belong to this model"):
        write_gguf(source, tmp_path / "x.gguf", tokenizer=real_tokenizer_path, progress=False)


def test_cli_export_gguf(tiny, tmp_path, capsys):
    assert main(["export-gguf", str(tiny), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m.gguf")
    assert main(["export-gguf", str(tiny), str(tmp_path / "m.gguf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-gguf", str(tmp_path / "nothing"), str(tmp_path / "n.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    bare = write_tiny_checkpoint(tmp_path / "bare", padded_vocab_size=8064)  # no tokenizer.model
    assert main(["export-gguf", str(bare), str(tmp_path / "n.gguf")]) == 2
    assert "--tokenizer FILE" in capsys.readouterr().err
    tokenizer = ["--tokenizer", str(DEFAULT_TOKENIZER)]
    assert main(["export-gguf", str(bare), str(tmp_path / "n.gguf"), *tokenizer]) == 0


# --- llama.cpp round trip ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def open_llama(llama_cpp, path: Path, **options):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False, **options
    )


def llama_greedy(llm, prompt_ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's last-token logits of the prompt [V], and the next ``steps`` argmax ids."""
    llm.reset()
    llm.eval(prompt_ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    logits, ids = first, []
    for _ in range(steps):
        ids.append(int(np.argmax(logits)))
        llm.eval([ids[-1]])
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return first, ids


def numpy_greedy(model: ChatGLM2, prompt_ids: list[int], steps: int):
    cache = model.new_cache()
    first = model.forward(np.asarray(prompt_ids), cache, last_only=True)[-1]
    logits, ids = first, []
    for _ in range(steps):
        ids.append(int(np.argmax(logits)))
        logits = model.forward(np.array([ids[-1]]), cache, last_only=True)[-1]
    return first, ids


def assert_same_tokens(llm, tokenizer: ChatGLM2Tokenizer):
    for text in TEXTS:
        ours = tokenizer.encode(text, add_special_tokens=False)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert theirs == ours, text
        # llama-cpp-python's detokenize keeps the "▁" SentencePiece puts before the text
        text_back = llm.detokenize(theirs).decode("utf-8")
        assert text_back.removeprefix(" ") == tokenizer.decode(ours), text


def test_llamacpp_tokenises_like_chatglm2_real_tokenizer(llama_cpp, tmp_path, real_tokenizer_path):
    source = tiny_with_tokenizer(tmp_path / "tiny", real_tokenizer_path, 65024)
    path = write_gguf(source, tmp_path / "vocab.gguf", progress=False)
    llm = open_llama(llama_cpp, path, vocab_only=True)
    tokenizer = ChatGLM2Tokenizer(real_tokenizer_path)
    assert_same_tokens(llm, tokenizer)
    for text in random_texts(500):
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ours, text


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Slices of the repository's docs (English, Chinese, code, markdown) and strings of random
    ASCII, CJK, emoji, control and Latin-1/Cyrillic characters."""
    import random

    rng = random.Random(seed)
    root = Path(__file__).resolve().parents[1]
    docs = [(root / "docs" / name).read_text(encoding="utf-8") for name in ("usage.md",)]
    docs.append((default_model_path() / "MODEL_CARD.md").read_text(encoding="utf-8"))
    ranges = [(32, 127), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 32), (0x80, 0x800)]
    texts = []
    for _ in range(count):
        if rng.random() < 0.7:
            doc = rng.choice(docs)
            start = rng.randrange(len(doc))
            texts.append(doc[start : start + rng.randrange(1, 80)])
        else:
            picks = [rng.choice(ranges) for _ in range(rng.randrange(1, 30))]
            texts.append("".join(chr(rng.randrange(*r)) for r in picks))
    return texts


@pytest.mark.parametrize("source", ["default", "tiny"])
def test_llamacpp_f16_agrees_with_glm_numpy(llama_cpp, source, tiny, tmp_path):
    directory = default_model_path() if source == "default" else tiny
    path = write_gguf(directory, tmp_path / "model.gguf", progress=False)
    llm = open_llama(llama_cpp, path, logits_all=True)  # keeps the logits in llm.scores
    tokenizer = ChatGLM2Tokenizer.from_pretrained(directory)
    assert_same_tokens(llm, tokenizer)
    prompt = tokenizer.build_chat_input("What is the capital of France? 你好")
    theirs, their_ids = llama_greedy(llm, prompt, 16)
    ours, our_ids = numpy_greedy(ChatGLM2.from_pretrained(directory), prompt, 16)
    error = np.linalg.norm(theirs - ours) / np.linalg.norm(ours)
    print(f"{source}: logits relative error {error:.2e}, greedy {their_ids} vs {our_ids}")
    assert error < 5e-3, f"last-token logits differ by {error:.2e} (relative)"
    assert their_ids == our_ids


def test_llamacpp_chat_template_builds_the_chatglm2_prompt(llama_cpp, tiny_files):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = open_llama(llama_cpp, tiny_files["f16"], vocab_only=True)
    tokenizer = ChatGLM2Tokenizer(DEFAULT_TOKENIZER)
    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"], eos_token="</s>", bos_token="<s>"
    )
    history = [("你好", "你好👋！有什么可以帮你？"), ("Name a colour.", "Blue.")]
    messages = [
        {"role": role, "content": text}
        for query, reply in history
        for role, text in (("user", query), ("assistant", reply))
    ] + [{"role": "user", "content": "And another  one?\n"}]
    prompt = formatter(messages=messages).prompt
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    assert ids == tokenizer.build_chat_input("And another  one?\n", history)


@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_llamacpp_quantised_files_load_and_generate(llama_cpp, type, tmp_path):
    path = write_gguf(default_model_path(), tmp_path / f"{type}.gguf", type, progress=False)
    llm = open_llama(llama_cpp, path)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(default_model_path())
    out = llm.create_completion(
        tokenizer.decode(tokenizer.encode("Once upon a time")), max_tokens=16, temperature=0
    )
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()
    reply = llm.create_chat_completion(
        [{"role": "user", "content": "Hello!"}], max_tokens=16, temperature=0
    )
    assert reply["choices"][0]["message"]["content"].strip()
