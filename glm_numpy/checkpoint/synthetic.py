"""Random checkpoints in the exact official layout: config.json, shards, index.

One writer for every size: ``tiny`` for tests (glm_numpy.testing.write_tiny_checkpoint) and
``6b`` for benchmarks (``glm-numpy make-random-checkpoint``), which has the real names, shapes,
shard split and byte size (12,487,168,064 bytes of tensors). Tensors are generated one at a
time and streamed to disk, so even the 6b checkpoint is written in bounded memory.

Values are chosen so a forward pass stays finite and says something: linear weights
~ N(0, 1/in) keep each projection's output the size of its input, norm weights are 1 + small
noise, biases small, and inv_freq holds its real values.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError
from glm_numpy.checkpoint.layout import TensorSpec, layer_prefix, official_tensors
from glm_numpy.checkpoint.safetensors_io import write_safetensors_stream
from glm_numpy.checkpoint.torch_zip import write_torch_zip_stream
from glm_numpy.config import ChatGLM2Config
from glm_numpy.dtypes import FLOAT_DTYPES, from_float32
from glm_numpy.quantize import quantize

# config.json of THUDM/chatglm2-6b at hub HEAD 8fd7fba, every key (spec §1.1).
OFFICIAL_CONFIG = {
    "_name_or_path": "THUDM/chatglm2-6b",
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
    },
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
    "torch_dtype": "float16",
    "transformers_version": "4.27.1",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

SIZES = {
    "6b": {},
    "tiny": {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "multi_query_group_num": 2,
        "multi_query_attention": True,
        "ffn_hidden_size": 96,
        "padded_vocab_size": 1024,
        "seq_length": 512,
    },
}

# The official shards were cut by transformers' save_pretrained(max_shard_size="2GB"): a new
# shard starts when the next tensor would push the current one past 2e9 bytes. That rule gives
# exactly the published 28, 31, 33, 34, 31, 33, 10 tensors per shard (spec §2.1).
OFFICIAL_MAX_SHARD_BYTES = 2 * 10**9

CHUNK_ELEMENTS = 1 << 22  # generate big tensors 4M values at a time (16 MB of float32)

ShardWriter = Callable[[Path, list, Iterator[np.ndarray]], None]


def random_config(size: str = "tiny", dtype: str = "float16", **overrides) -> dict:
    """The official config.json with the sizes of ``size`` and any overrides (validated)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {sorted(SIZES)}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(FLOAT_DTYPES)}")
    values = {**OFFICIAL_CONFIG, **SIZES[size], "torch_dtype": dtype, **overrides}
    ChatGLM2Config.from_dict(values, source=f"{size} config")  # raises ConfigError if unfit
    return values


def storage_dtype(spec: TensorSpec, dtype: str) -> np.dtype:
    """What a tensor is stored as: int8 codes, fp16 scales (official), else the model dtype."""
    if spec.kind == "quantized":
        return np.dtype(np.int8)
    if spec.kind == "scale":
        return np.dtype(np.float16)
    return FLOAT_DTYPES[dtype]


def tensor_nbytes(spec: TensorSpec, dtype: str) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * storage_dtype(spec, dtype).itemsize


# --- values --------------------------------------------------------------------------------


def random_tensors(
    config: ChatGLM2Config, dtype: str, seed: int = 0
) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """(spec, array) for every official tensor, in state-dict order, one at a time.

    Each tensor has its own random stream (seed, index), so values do not depend on sharding.
    """
    scales: dict[str, np.ndarray] = {}  # a quantised weight's scale, made together with it
    for index, spec in enumerate(official_tensors(config)):
        if spec.kind == "scale":
            yield spec, scales.pop(spec.name)
            continue
        rng = np.random.default_rng([seed, index])
        if spec.kind == "quantized":
            weight = normal((spec.shape[0], spec.fan_in), 1 / np.sqrt(spec.fan_in), 0, rng)
            quantized = quantize(weight, config.quantization_bit)
            scales[spec.name + "_scale"] = quantized.scale  # <module>.weight_scale
            yield spec, quantized.q
        else:
            yield spec, random_float_tensor(spec, config, dtype, rng)


def random_float_tensor(
    spec: TensorSpec, config: ChatGLM2Config, dtype: str, rng: np.random.Generator
) -> np.ndarray:
    if spec.kind == "inv_freq":
        R = config.rotary_dim
        inv_freq = 1.0 / 10000 ** (np.arange(0, R, 2, dtype=np.float32) / R)  # [R/2]
        return from_float32(inv_freq, dtype)
    std, mean = {
        "embedding": (1.0, 0.0),
        "norm": (0.1, 1.0),
        "bias": (0.1, 0.0),
        "linear": (1 / np.sqrt(spec.fan_in or 1), 0.0),
    }[spec.kind]
    return normal(spec.shape, std, mean, rng, dtype)


def normal(shape, std, mean, rng, dtype: str = "float32") -> np.ndarray:
    """N(mean, std^2) values stored as ``dtype``, generated a chunk of rows at a time so a
    [65024, 4096] table never exists in float32."""
    out = np.empty(shape, FLOAT_DTYPES[dtype])
    rows = out.reshape(shape[0], -1) if out.ndim else out.reshape(1, 1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rng.standard_normal((min(step, rows.shape[0] - start), rows.shape[1]), np.float32)
        block *= np.float32(std)
        block += np.float32(mean)
        rows[start : start + step] = from_float32(block, dtype)
    return out


# --- shards --------------------------------------------------------------------------------


def greedy_shards(specs: list[TensorSpec], dtype: str, max_bytes: int) -> list[list[TensorSpec]]:
    """transformers' rule: start a new shard when the next tensor would overflow this one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = tensor_nbytes(spec, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def split_middle_layer(specs: list[TensorSpec], config: ChatGLM2Config) -> list[list[TensorSpec]]:
    """Two shards cut inside layer L//2, between its attention half and its MLP, the way the
    official split puts layer 3's attention in shard 1 and its MLP in shard 2."""
    first_mlp = layer_prefix(config.num_layers // 2) + "mlp."
    cut = next(i for i, spec in enumerate(specs) if spec.name.startswith(first_mlp))
    return [specs[:cut], specs[cut:]]


def shard_file_name(fmt: str, k: int, n: int) -> str:
    if fmt == "safetensors":
        return f"model-{k:05d}-of-{n:05d}.safetensors"
    return f"pytorch_model-{k:05d}-of-{n:05d}.bin"


def index_file_name(fmt: str) -> str:
    return (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )


def default_shard_writer(fmt: str) -> ShardWriter:
    if fmt == "safetensors":
        return lambda path, entries, arrays: write_safetensors_stream(
            path, entries, arrays, metadata={"format": "pt"}
        )
    if fmt == "bin":
        return write_torch_zip_stream
    raise ValueError(f"fmt={fmt!r}: expected 'safetensors' or 'bin'")


def write_index(directory: Path, fmt: str, weight_map: dict[str, str], total_size: int) -> None:
    """The index json as transformers writes it: total bytes and a name-sorted weight_map."""
    index = {
        "metadata": {"total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    text = json.dumps(index, indent=2) + "\n"
    (directory / index_file_name(fmt)).write_text(text, encoding="utf-8")


# --- the whole checkpoint ----------------------------------------------------------------


def write_random_checkpoint(
    directory: str | Path,
    config_values: dict,
    fmt: str = "safetensors",
    seed: int = 0,
    shard_plan: str = "split-middle-layer",
    shard_writer: ShardWriter | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write config.json, the shards and the index into ``directory`` (created if needed).

    shard_plan: "split-middle-layer" (two shards, one layer across them) or "official"
    (transformers' 2 GB rule: the real 7-shard split at 6b sizes).
    progress: called with the byte count of each tensor once written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = ChatGLM2Config.from_dict(config_values)
    dtype = config_values.get("torch_dtype") or "float32"
    specs = official_tensors(config)
    if shard_plan == "official":
        plan = greedy_shards(specs, dtype, OFFICIAL_MAX_SHARD_BYTES)
    elif shard_plan == "split-middle-layer":
        plan = split_middle_layer(specs, config)
    else:
        raise ValueError(f"shard_plan={shard_plan!r}")
    write_shard = shard_writer or default_shard_writer(fmt)
    tensors = random_tensors(config, dtype, seed)
    weight_map: dict[str, str] = {}
    for k, shard_specs in enumerate(plan, start=1):
        file_name = shard_file_name(fmt, k, len(plan))
        entries = [(s.name, storage_dtype(s, dtype), s.shape) for s in shard_specs]
        arrays = _reporting(itertools.islice(tensors, len(shard_specs)), progress)
        write_shard(directory / file_name, entries, arrays)
        weight_map.update(dict.fromkeys((s.name for s in shard_specs), file_name))
    total_size = sum(tensor_nbytes(spec, dtype) for spec in specs)
    write_index(directory, fmt, weight_map, total_size)
    text = json.dumps(config_values, indent=2) + "\n"
    (directory / "config.json").write_text(text, encoding="utf-8")
    return directory


def _reporting(
    tensors: Iterator[tuple[TensorSpec, np.ndarray]], progress: Callable[[int], None] | None
) -> Iterator[np.ndarray]:
    """The arrays of (spec, array) pairs, reporting each one's size after it is consumed."""
    for spec, array in tensors:
        if array.shape != spec.shape:
            raise CheckpointError(f"internal: {spec.name} generated as {array.shape}")
        yield array
        if progress is not None:
            progress(array.nbytes)
