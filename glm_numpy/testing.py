"""Helpers for tests: tiny random checkpoints in the exact official layout.

    write_tiny_checkpoint(directory, seed=0, fmt="safetensors", dtype="float32", **overrides)

writes config.json (every official key, tiny sizes), two shards with one layer split across
them (``model-0000k-of-00002.safetensors`` or ``pytorch_model-0000k-of-00002.bin``) and the
index json. ``.bin`` shards are written by the real ``torch.save``, so the loader is tested
against torch's own files (torch is a test dependency only).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.synthetic import random_config, write_random_checkpoint
from glm_numpy.dtypes import BFLOAT16


def write_tiny_checkpoint(
    directory: str | Path,
    seed: int = 0,
    fmt: str = "safetensors",
    dtype: str = "float32",
    **config_overrides,
) -> Path:
    """A random tiny ChatGLM2 checkpoint; returns the directory.

    Defaults: 2 layers, D=64, H=4, G=2, Dh=16, F=96, V=1024. Any config.json key can be
    overridden, e.g. ``num_layers=3`` or ``quantization_bit=4`` (the official quantised
    layout: int8 ``.weight`` + fp16 ``.weight_scale``).
    """
    config_values = random_config("tiny", dtype, **config_overrides)
    writer = _torch_save_shard if fmt == "bin" else None
    return write_random_checkpoint(
        directory, config_values, fmt=fmt, seed=seed, shard_writer=writer
    )


def _torch_save_shard(path: Path, entries: list, arrays) -> None:
    import torch  # tests only: the package itself never imports torch

    state_dict = collections.OrderedDict()
    for (name, _, _), array in zip(entries, arrays):
        state_dict[name] = numpy_to_torch(array)
    torch.save(state_dict, path)


def numpy_to_torch(array: np.ndarray):
    """A torch tensor with the same bits; uint16 arrays become bfloat16 (our convention)."""
    import torch

    array = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d arrays 0-d
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def torch_to_numpy(tensor) -> np.ndarray:
    """The inverse of numpy_to_torch: bfloat16 comes back as uint16 bit patterns."""
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def glm_state_dict(config, tensor) -> dict:
    """Official ChatGLM2 names -> the names of transformers' GlmForCausalLM (spec §10), which
    computes the same function: the torch oracle of the tests and the benchmark's baseline.

    ``tensor(official_name)`` gives each official tensor as a torch tensor (a float32 copy, a
    bfloat16 view…); query_key_value is split by rows into q, k and v.
    """
    H, G, Dh = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    rows = {"q": slice(0, H * Dh), "k": slice(H * Dh, (H + G) * Dh), "v": slice((H + G) * Dh, None)}
    state = {
        "model.embed_tokens.weight": tensor("transformer.embedding.word_embeddings.weight"),
        "model.norm.weight": tensor("transformer.encoder.final_layernorm.weight"),
        "lm_head.weight": tensor("transformer.output_layer.weight"),
    }
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}", f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{dst}.{norm}.weight"] = tensor(f"{src}.{norm}.weight")
        qkv = tensor(f"{src}.self_attention.query_key_value.weight")
        bias = tensor(f"{src}.self_attention.query_key_value.bias")
        for part, part_rows in rows.items():
            state[f"{dst}.self_attn.{part}_proj.weight"] = qkv[part_rows]
            state[f"{dst}.self_attn.{part}_proj.bias"] = bias[part_rows]
        state[f"{dst}.self_attn.o_proj.weight"] = tensor(f"{src}.self_attention.dense.weight")
        state[f"{dst}.mlp.gate_up_proj.weight"] = tensor(f"{src}.mlp.dense_h_to_4h.weight")
        state[f"{dst}.mlp.down_proj.weight"] = tensor(f"{src}.mlp.dense_4h_to_h.weight")
    return state
