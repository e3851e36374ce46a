"""The independent full-model oracle: transformers' GlmForCausalLM computes the same function as
ChatGLM2 given the config and weight rename of spec §10."""

import numpy as np
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_numpy import ChatGLM2Config
from glm_numpy.dtypes import to_float32


def glm_config(config: ChatGLM2Config) -> GlmConfig:
    return GlmConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        rms_norm_eps=config.layernorm_epsilon,
        attention_bias=config.add_qkv_bias,
        tie_word_embeddings=False,
        max_position_embeddings=config.seq_length,
        pad_token_id=0,  # GlmConfig's default (151329) lies outside a ChatGLM2 vocabulary
        eos_token_id=2,
        bos_token_id=None,
    )


def glm_state_dict(config: ChatGLM2Config, weights) -> dict[str, torch.Tensor]:
    """Official ChatGLM2 names -> Glm names; query_key_value split by rows into q, k, v."""
    H, G, Dh = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
    rows = {"q": (0, H * Dh), "k": (H * Dh, (H + G) * Dh), "v": ((H + G) * Dh, (H + 2 * G) * Dh)}

    def tensor(name):
        return torch.from_numpy(np.array(to_float32(weights[name])))  # a writable copy

    state = {
        "model.embed_tokens.weight": tensor("transformer.embedding.word_embeddings.weight"),
        "model.norm.weight": tensor("transformer.encoder.final_layernorm.weight"),
        "lm_head.weight": tensor("transformer.output_layer.weight"),
    }
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}", f"model.layers.{i}"
        state[f"{dst}.input_layernorm.weight"] = tensor(f"{src}.input_layernorm.weight")
        state[f"{dst}.post_attention_layernorm.weight"] = tensor(
            f"{src}.post_attention_layernorm.weight"
        )
        qkv_weight = tensor(f"{src}.self_attention.query_key_value.weight")
        qkv_bias = tensor(f"{src}.self_attention.query_key_value.bias")
        for part, (begin, end) in rows.items():
            state[f"{dst}.self_attn.{part}_proj.weight"] = qkv_weight[begin:end]
            state[f"{dst}.self_attn.{part}_proj.bias"] = qkv_bias[begin:end]
        state[f"{dst}.self_attn.o_proj.weight"] = tensor(f"{src}.self_attention.dense.weight")
        state[f"{dst}.mlp.gate_up_proj.weight"] = tensor(f"{src}.mlp.dense_h_to_4h.weight")
        state[f"{dst}.mlp.down_proj.weight"] = tensor(f"{src}.mlp.dense_4h_to_h.weight")
    return state


def glm_oracle(config: ChatGLM2Config, weights) -> GlmForCausalLM:
    """A float32 GlmForCausalLM holding the same weights (eager attention: plain fp32 math)."""
    torch.manual_seed(0)
    model = GlmForCausalLM(glm_config(config)).float().eval()
    model.config._attn_implementation = "eager"
    model.load_state_dict(glm_state_dict(config, weights), strict=True)
    return model


def rotary_inverse_frequencies(model: GlmForCausalLM) -> torch.Tensor:
    return model.model.rotary_emb.inv_freq
