"""A ChatGLM2 checkpoint as one GGUF file for llama.cpp (its "chatglm" architecture).

    write_gguf(src_dir, dst_path, type="f16")       type: "f16", "q8_0" or "q4_0"

The file holds everything llama.cpp needs and nothing else does: the hyper-parameters, the
weights under llama.cpp's names, the SentencePiece vocabulary (pieces, scores, token types) with
ChatGLM2's five special tokens after it (sop and eop spelled <sop> and <eop>: gguf_vocabulary
says why), and the chat template. llama.cpp then tokenises as
ChatGLM2Tokenizer does and its chat mode (``--jinja``, the default) builds the same prompt.

Tensor names and shapes (llama.cpp src/models/chatglm.cpp; GGUF lists dims fastest first, so a
numpy [O, I] weight is ggml {I, O} and is written as is):

    transformer.embedding.word_embeddings.weight  [V, D]    token_embd.weight
    ...layers.N.input_layernorm.weight            [D]       blk.N.attn_norm.weight
    ...layers.N.self_attention.query_key_value    [(H+2G)*Dh, D] + bias   blk.N.attn_qkv.*
    ...layers.N.self_attention.dense.weight       [D, H*Dh] blk.N.attn_output.weight
    ...layers.N.post_attention_layernorm.weight   [D]       blk.N.ffn_norm.weight
    ...layers.N.mlp.dense_h_to_4h.weight          [2F, D]   blk.N.ffn_up.weight (gate rows first:
                                                            llama.cpp's fused SwiGLU splits the
                                                            same way, silu(first half) * second)
    ...layers.N.mlp.dense_4h_to_h.weight          [D, F]    blk.N.ffn_down.weight
    transformer.encoder.final_layernorm.weight    [D]       output_norm.weight
    transformer.output_layer.weight               [V, D]    output.weight

inv_freq is dropped: llama.cpp's rope (type NORM: rotates adjacent pairs, as ChatGLM2 does, over
the first R = Dh/2 channels of a head) derives it from rope.dimension_count and freq_base.

Weights are written f16, or quantised by the gguf package's Q8_0/Q4_0 quantisers (blocks of 32
along a row). A weight whose rows are not a multiple of 32 long stays f16, as llama-quantize
does; in a q4_0 file the output layer is q8_0 (llama-quantize keeps it wider too). Norms and
the qkv bias are f32. Tensors are converted and written one at a time (quantised a chunk of rows
at a time), into a temporary name renamed at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf  # the optional extra: pip install "glm-numpy[gguf]"
import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError
from glm_numpy.checkpoint.index import load_checkpoint
from glm_numpy.checkpoint.validate import validate_checkpoint
from glm_numpy.checkpoint.writing import (
    refuse_existing,
    release_pages,
    temporary_file,
)
from glm_numpy.config import ChatGLM2Config, ConfigError
from glm_numpy.dtypes import to_float32
from glm_numpy.progress import progress_bar
from glm_numpy.tokenizer import SPECIAL_TOKENS, ChatGLM2Tokenizer

GGUF_TYPES = ("f16", "q8_0", "q4_0")
ARCHITECTURE = "chatglm"
ROPE_FREQ_BASE = 10000.0
QUANT_CHUNK_ROWS = 1024  # rows quantised at a time: bounds the float32 temporaries

# ChatGLM2's prompt (tokenizer.build_prompt, spec §4.4) as a Jinja template over chat messages:
# the two prefix tokens, then each user turn opens round i and ends with "答：", each assistant
# turn is the reply and the two line feeds that close the round. ChatGLM2 has no system role.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(round=0) -%}"
    "{PREFIX}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "[Round {{ ns.round }}]\n\n问：{{ message['content'] }}\n\n答："
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] + '\\n\\n' }}"  # in an expression: {%- would strip bare \n
    "{%- else -%}"
    "{{ raise_exception('ChatGLM2 has only user and assistant messages, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# gguf's token types (SentencePiece's): llama.cpp treats CONTROL tokens as text only when asked.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def write_gguf(
    src_dir: str | Path,
    dst_path: str | Path,
    type: str = "f16",  # the name the command line and the issue use
    *,
    tokenizer: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write the 16-bit or float32 checkpoint directory ``src_dir`` as the GGUF file ``dst_path``.

    tokenizer: a tokenizer.model (default: the one in src_dir). A quantised source is refused:
    export from the 16-bit checkpoint. Returns dst_path.
    """
    src, dst = Path(src_dir), Path(dst_path)
    if type not in GGUF_TYPES:
        raise ValueError(f"type={type!r}: expected one of {', '.join(GGUF_TYPES)}")
    refuse_existing(dst)
    config = _config(src)
    if config.quantization_bit:
        raise CheckpointError(
            f"{src}: quantised checkpoint (quantization_bit={config.quantization_bit}); export "
            "from the 16-bit checkpoint, and choose the GGUF type with --type"
        )
    if tokenizer is None and not (src / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{src}: no tokenizer.model here; name one with tokenizer= (--tokenizer FILE)"
        )
    sp = ChatGLM2Tokenizer(Path(tokenizer) if tokenizer else src / "tokenizer.model")
    checkpoint = load_checkpoint(src)
    validate_checkpoint(checkpoint, config)

    with temporary_file(dst) as work:
        writer = gguf.GGUFWriter(work, ARCHITECTURE)
        try:
            _write(writer, checkpoint, config, sp, src, type, progress)
        finally:
            writer.close()
    return dst


def _write(writer, checkpoint, config, sp, src: Path, type: str, progress: bool) -> None:
    """Metadata, vocabulary, tensor infos, then the tensors one at a time."""
    plan = list(tensor_plan(config, type))
    _add_metadata(writer, config, src, type)
    _add_vocabulary(writer, sp, config.padded_vocab_size)
    for name, gguf_name, ggml_type in plan:
        writer.add_tensor_info(
            gguf_name,
            checkpoint[name].shape,
            np.dtype(np.float32),  # ignored: raw_dtype says what is stored
            _stored_nbytes(checkpoint[name].shape, ggml_type),
            raw_dtype=ggml_type,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(checkpoint[name].nbytes for name, _, _ in plan)
    with progress_bar(total, f"gguf {type}", "B", enabled=progress) as bar:
        for name, _, ggml_type in plan:
            array = checkpoint[name]
            writer.write_tensor_data(_stored(array, ggml_type))
            bar.update(array.nbytes)
            release_pages(array)


def _config(src: Path) -> ChatGLM2Config:
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json (export-gguf needs a checkpoint directory)")
    try:
        return ChatGLM2Config.from_json(src / "config.json")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def tensor_plan(config: ChatGLM2Config, type: str) -> Iterator[tuple[str, str, int]]:
    """(official name, GGUF name, ggml type) of every tensor written, in file order."""
    T = gguf.GGMLQuantizationType
    wide = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[type]

    def matrix(name: str, gguf_name: str, columns: int, ggml_type=wide):
        block, _ = gguf.GGML_QUANT_SIZES[ggml_type]
        return name, gguf_name, ggml_type if columns % block == 0 else T.F16

    D, F = config.hidden_size, config.ffn_hidden_size
    yield matrix("transformer.embedding.word_embeddings.weight", "token_embd.weight", D)
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"blk.{i}."
        yield src + "input_layernorm.weight", dst + "attn_norm.weight", T.F32
        qkv = src + "self_attention.query_key_value."
        yield matrix(qkv + "weight", dst + "attn_qkv.weight", D)
        yield qkv + "bias", dst + "attn_qkv.bias", T.F32
        heads = config.num_attention_heads * config.head_dim
        yield matrix(src + "self_attention.dense.weight", dst + "attn_output.weight", heads)
        yield src + "post_attention_layernorm.weight", dst + "ffn_norm.weight", T.F32
        yield matrix(src + "mlp.dense_h_to_4h.weight", dst + "ffn_up.weight", D)
        yield matrix(src + "mlp.dense_4h_to_h.weight", dst + "ffn_down.weight", F)
    yield "transformer.encoder.final_layernorm.weight", "output_norm.weight", T.F32
    output_type = T.Q8_0 if type == "q4_0" else wide
    yield matrix("transformer.output_layer.weight", "output.weight", D, output_type)


def _stored_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * block_bytes


def _stored(array: np.ndarray, ggml_type: int) -> np.ndarray:
    """One tensor as the bytes GGUF stores: f32, f16, or quantised a chunk of rows at a time."""
    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return to_float32(array)
    if ggml_type == T.F16:
        if array.dtype == np.float16:
            return array
        out = np.empty(array.shape, np.float16)
        for start in range(0, array.shape[0], QUANT_CHUNK_ROWS):
            rows = slice(start, start + QUANT_CHUNK_ROWS)
            out[rows] = to_float32(array[rows])
        return out
    return np.concatenate(
        [
            gguf.quants.quantize(to_float32(array[start : start + QUANT_CHUNK_ROWS]), ggml_type)
            for start in range(0, array.shape[0], QUANT_CHUNK_ROWS)
        ]
    )


def _add_metadata(writer, config: ChatGLM2Config, src: Path, type: str) -> None:
    writer.add_name(src.resolve().name)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_kv_groups)
    writer.add_layer_norm_rms_eps(config.layernorm_epsilon)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(ROPE_FREQ_BASE)
    file_types = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_vocabulary(
    tokenizer: ChatGLM2Tokenizer, vocab_size: int
) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and token types of all ``vocab_size`` rows of the embedding.

    The SentencePiece pieces keep their ids, text, scores and kinds; ChatGLM2's special tokens
    follow as CONTROL tokens; the rows past them (the padded vocabulary) get placeholder
    [PAD<id>] names as UNUSED tokens, so that the token list matches the embedding.

    A special token is named as ChatGLM2 names it unless two pieces spell it ("s" + "op" is
    "sop"): llama.cpp's SentencePiece merges pairs of symbols into any token of the list, of
    whatever kind, so plain text "sop" would become the special token. Such a token is written
    "<sop>" (GLM-4's spelling), which no merge reaches; its id is unchanged.
    """
    sp = tokenizer.sp
    n = sp.GetPieceSize()
    if n + len(SPECIAL_TOKENS) > vocab_size:
        raise CheckpointError(
            f"{tokenizer.path}: {n + len(SPECIAL_TOKENS)} token ids, more than the model's "
            f"padded_vocab_size {vocab_size}: this tokenizer does not belong to this model"
        )
    pieces = [sp.IdToPiece(i) for i in range(n)]
    scores = [sp.GetScore(i) for i in range(n)]
    types = [_piece_type(sp, i) for i in range(n)]
    vocabulary = set(pieces)
    pieces += [_unmergeable(name, vocabulary) for name in SPECIAL_TOKENS]
    scores += [0.0] * len(SPECIAL_TOKENS)
    types += [CONTROL] * len(SPECIAL_TOKENS)
    pads = range(len(pieces), vocab_size)
    return (
        pieces + [f"[PAD{i}]" for i in pads],
        scores + [0.0] * len(pads),
        types + [UNUSED] * len(pads),
    )


def _unmergeable(name: str, vocabulary: set[str]) -> str:
    spelled = any(name[:k] in vocabulary and name[k:] in vocabulary for k in range(1, len(name)))
    return f"<{name}>" if spelled else name


def _piece_type(sp, i: int) -> int:
    for is_kind, kind in (
        (sp.IsUnknown, UNKNOWN),
        (sp.IsControl, CONTROL),
        (sp.IsByte, BYTE),
        (sp.IsUnused, UNUSED),
    ):
        if is_kind(i):
            return kind
    return NORMAL


def _add_vocabulary(writer, tokenizer: ChatGLM2Tokenizer, vocab_size: int) -> None:
    pieces, scores, types = gguf_vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece (SPM) tokenizer
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # SentencePiece's normaliser as ChatGLM2's model sets it: a "▁" before the text (dummy
    # prefix), runs of spaces kept.
    writer.add_add_space_prefix(tokenizer.sp.EncodeAsPieces("a")[0].startswith("▁"))
    writer.add_remove_extra_whitespaces(False)
    writer.add_bos_token_id(1)  # <s>: exists, never added (spec §4.2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    prefix = "".join(pieces[i] for i in tokenizer.prefix_ids)  # [gMASK] <sop>
    writer.add_chat_template(CHAT_TEMPLATE.replace("{PREFIX}", prefix))


__all__ = ["CHAT_TEMPLATE", "GGUF_TYPES", "gguf_vocabulary", "write_gguf"]
