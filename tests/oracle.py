"""The independent full-model oracle: transformers' GlmForCausalLM computes the same function as
ChatGLM2 given the config and weight rename of spec §10."""

import numpy as np
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_numpy import ChatGLM2Config
from glm_numpy.dtypes import to_float32
from glm_numpy.testing import glm_state_dict


def glm_config(config: ChatGLM2Config) -> GlmConfig:
    return GlmConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.multi_query_group_num,
        head_dim=config.kv_channels,
        rope_parameters=rope_parameters(config),
        rms_norm_eps=config.layernorm_epsilon,
        attention_bias=config.add_qkv_bias,
        tie_word_embeddings=False,
        max_position_embeddings=config.seq_length,
        pad_token_id=0,  # GlmConfig's default (151329) lies outside a ChatGLM2 vocabulary
        eos_token_id=2,
        bos_token_id=None,
    )


def rope_parameters(config: ChatGLM2Config) -> dict:
    """Half of each head rotates; a -32K model's rope_ratio as its family applies it: ChatGLM3
    multiplies the base (rope_theta = 10000 x rope_ratio), ChatGLM2-6B-32K divides the positions,
    which is transformers' linear rope scaling with factor = rope_ratio."""
    rope = {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": 0.5}
    if config.rotary_position_divisor != 1:
        rope.update(rope_type="linear", factor=config.rotary_position_divisor)
    return rope


def glm_oracle(config: ChatGLM2Config, weights) -> GlmForCausalLM:
    """A float32 GlmForCausalLM holding the same weights (eager attention: plain fp32 math)."""
    torch.manual_seed(0)
    model = GlmForCausalLM(glm_config(config)).float().eval()
    model.config._attn_implementation = "eager"

    def tensor(name):
        return torch.from_numpy(np.array(to_float32(weights[name])))  # a writable float32 copy

    model.load_state_dict(glm_state_dict(config, tensor), strict=True)
    return model


def rotary_inverse_frequencies(model: GlmForCausalLM) -> torch.Tensor:
    return model.model.rotary_emb.inv_freq
