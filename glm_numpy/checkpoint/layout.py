"""The official tensor list of a ChatGLM2 checkpoint, derived from its config (spec §2.2, §6).

One place says which tensors exist, their shapes and what kind of values they hold; the random
checkpoint writer and the validator both read it, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses

from glm_numpy.config import ChatGLM2Config

# The Linear layers the official quantiser replaces (spec §6.1); nothing else is quantised.
QUANTIZED_MODULES = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of the official state dict.

    kind: "embedding", "inv_freq", "norm", "linear" (float [out, in]), "bias",
          "quantized" (int8 [out, in] or [out, in/2] for int4), "scale" (per-row [out]).
    fan_in: input features of a linear / quantised weight (None otherwise).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    fan_in: int | None = None


def layer_prefix(i: int) -> str:
    return f"transformer.encoder.layers.{i}."


def official_tensors(config: ChatGLM2Config) -> list[TensorSpec]:
    """Every tensor of the official checkpoint in state-dict order (the order shards follow)."""
    V, D = config.padded_vocab_size, config.hidden_size
    specs = [
        TensorSpec("transformer.embedding.word_embeddings.weight", (V, D), "embedding"),
        # Half of each head is rotated (R = Dh/2 channels), in pairs: R/2 frequencies.
        TensorSpec("transformer.rotary_pos_emb.inv_freq", (config.rotary_dim // 2,), "inv_freq"),
    ]
    for i in range(config.num_layers):
        specs += layer_tensors(config, i)
    specs.append(TensorSpec("transformer.encoder.final_layernorm.weight", (D,), "norm"))
    if config.extra.get("quantization_output_layer"):  # glm_numpy's quantize option
        specs += linear(config, "transformer.output_layer", V, D)
    else:
        specs.append(TensorSpec("transformer.output_layer.weight", (V, D), "linear", fan_in=D))
    return specs


def layer_tensors(config: ChatGLM2Config, i: int) -> list[TensorSpec]:
    """The 7 tensors of block i (11 when quantised: a weight_scale after each Linear)."""
    D, F = config.hidden_size, config.ffn_hidden_size
    HDh = config.num_attention_heads * config.head_dim  # attention output channels
    p = layer_prefix(i)
    specs = [TensorSpec(p + "input_layernorm.weight", (D,), "norm")]
    specs += linear(config, p + "self_attention.query_key_value", config.qkv_size, D)
    if config.add_qkv_bias:
        specs.append(
            TensorSpec(p + "self_attention.query_key_value.bias", (config.qkv_size,), "bias")
        )
    specs += linear(config, p + "self_attention.dense", D, HDh)
    specs.append(TensorSpec(p + "post_attention_layernorm.weight", (D,), "norm"))
    specs += linear(config, p + "mlp.dense_h_to_4h", 2 * F, D)  # gate and up, stacked
    specs += linear(config, p + "mlp.dense_4h_to_h", D, F)
    return specs


def linear(config: ChatGLM2Config, module: str, out_features: int, in_features: int):
    """A Linear weight [out, in]; or, quantised, int8 [out, in] / [out, in/2] + scale [out]
    (official, per row) or [out, in/group_size] (glm_numpy's group-wise scheme)."""
    bits = config.quantization_bit
    if not bits:
        return [TensorSpec(module + ".weight", (out_features, in_features), "linear", in_features)]
    stored_columns = in_features // 2 if bits == 4 else in_features
    group_size = config.extra.get("quantization_group_size")
    scale_shape = (out_features,) if not group_size else (out_features, in_features // group_size)
    return [
        TensorSpec(module + ".weight", (out_features, stored_columns), "quantized", in_features),
        TensorSpec(module + ".weight_scale", scale_shape, "scale"),
    ]
