"""ChatGLM2Config: the official config.json of THUDM/chatglm2-6b, read and validated.

Every key of the official file is an attribute (spec §1.1); keys the file leaves out take the
config-class defaults (spec §1.2); keys we do not know are kept in ``extra`` so that a config
read and written back loses nothing. Settings this interpreter does not implement (LayerNorm
instead of RMSNorm, biases on the dense layers, post-norm residuals, P-tuning prefixes…) are
refused up front with a ``ConfigError`` that names the key, rather than computing a different
model silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that is unreadable, incomplete or asks for something unsupported."""


NOT_JSON_KEYS = {"extra", "rope_ratio_scales"}  # dataclass fields that are not config.json keys


@dataclasses.dataclass
class ChatGLM2Config:
    # sizes (defaults = ChatGLM2-6B, spec §1.2 / §1.1)
    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    # numerics and structure
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    fp32_residual_connection: bool = False
    original_rope: bool = True
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    # training-only switches, no effect at inference
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    bias_dropout_fusion: bool = True
    # quantisation and prompt tuning
    quantization_bit: int = 0
    # long context (the -32K models): what it means depends on the family (docs/family.md)
    rope_ratio: float | None = None  # absent = 1
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    # generation-related ids and bookkeeping
    eos_token_id: int = 2
    pad_token_id: int = 0
    tie_word_embeddings: bool = False
    use_cache: bool = True
    torch_dtype: str | None = None
    model_type: str = "chatglm"
    architectures: list[str] | None = None
    auto_map: dict[str, str] | None = None
    transformers_version: str | None = None
    # keys this class does not know, kept verbatim
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Not a config.json key: how this directory's modeling code applies rope_ratio, "positions"
    # (ChatGLM2-6B-32K divides the positions by it) or "base" (ChatGLM3 multiplies the rotary
    # base by it). from_json finds it from the directory when rope_ratio is not 1.
    rope_ratio_scales: str | None = None

    # --- derived sizes, named with the shape legend (H, G, Dh, R, D, F, V, L) ---
    @property
    def num_kv_groups(self) -> int:
        """G: number of K/V heads (1 per query head when multi_query_attention is off)."""
        if self.multi_query_attention:
            return self.multi_query_group_num
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Dh: channels per attention head."""
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """R: rotated channels per head; ChatGLM2 rotates the first half (spec §3.4)."""
        return self.kv_channels // 2

    @property
    def rotary_base(self) -> float:
        """The base of the rotary frequencies: 10000, times rope_ratio for ChatGLM3."""
        return 10000.0 * self._rope_ratio_if("base")

    @property
    def rotary_position_divisor(self) -> float:
        """What positions are divided by before rotary: rope_ratio for ChatGLM2-6B-32K, else 1."""
        return float(self._rope_ratio_if("positions"))

    def _rope_ratio_if(self, scales: str) -> float:
        ratio = 1 if self.rope_ratio is None else self.rope_ratio
        if ratio != 1 and self.rope_ratio_scales not in ("positions", "base"):
            raise ConfigError(
                f"rope_ratio={ratio!r}: its meaning depends on the model family (ChatGLM2-6B-32K "
                "divides the positions by it, ChatGLM3-6B-32K multiplies the rotary base); open "
                "the model with its family (--family, or family= in Python)"
            )
        return ratio if self.rope_ratio_scales == scales else 1

    @property
    def qkv_size(self) -> int:
        """Rows of query_key_value: H*Dh query channels, then G*Dh for K and for V."""
        return (self.num_attention_heads + 2 * self.num_kv_groups) * self.kv_channels

    # --- reading and writing ---
    @classmethod
    def from_dict(
        cls, values: dict[str, Any], source: str = "config", rope_ratio_scales: str | None = None
    ) -> ChatGLM2Config:
        known = {f.name for f in dataclasses.fields(cls)} - NOT_JSON_KEYS
        if rope_ratio_scales is None and values.get("rope_ratio", 1) != 1:
            from glm_numpy.family import ROPE_RATIO_SCALES, family_named

            name = values.get("_name_or_path")  # official configs name their model
            family = family_named(name) if isinstance(name, str) else None
            rope_ratio_scales = ROPE_RATIO_SCALES.get(family)
        config = cls(
            **{k: v for k, v in values.items() if k in known},
            extra={k: v for k, v in values.items() if k not in known},
            rope_ratio_scales=rope_ratio_scales,
        )
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str | Path, family: str | None = None) -> ChatGLM2Config:
        """Read config.json (or a directory's). A rope_ratio other than 1 is read the way the
        model family's code reads it: `family` ("chatglm2", "chatglm3", "codegeex2") when given,
        else what the directory shows (glm_numpy.family.rope_ratio_scales)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        scales, ratio = None, values.get("rope_ratio", 1)
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio != 1:
            from glm_numpy.family import rope_ratio_scales

            scales = rope_ratio_scales(path.parent, values, family)
        return cls.from_dict(values, source=str(path), rope_ratio_scales=scales)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.pop("rope_ratio_scales")
        extra = values.pop("extra")
        return {**{k: v for k, v in values.items() if v is not None}, **extra}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    # --- validation ---
    def validate(self, source: str = "config") -> None:
        """Refuse sizes that do not fit together and settings this interpreter does not compute."""

        def fail(key: str, why: str) -> None:
            raise ConfigError(f"{source}: {key}={getattr(self, key)!r}: {why}")

        for key in (
            "num_layers",
            "padded_vocab_size",
            "hidden_size",
            "ffn_hidden_size",
            "kv_channels",
            "num_attention_heads",
            "seq_length",
            "multi_query_group_num",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(key, "must be a positive integer")
        if self.kv_channels % 4:
            fail("kv_channels", "must be a multiple of 4 (half is rotated, in pairs)")
        if self.num_attention_heads % self.num_kv_groups:
            fail("multi_query_group_num", "must divide num_attention_heads")
        eps = self.layernorm_epsilon
        if (
            isinstance(eps, bool)
            or not isinstance(eps, (int, float))
            or not (math.isfinite(eps) and eps > 0)
        ):
            fail("layernorm_epsilon", "must be a positive finite number")
        unsupported = {
            "rmsnorm": (False, "only RMSNorm is implemented (ChatGLM2 uses RMSNorm)"),
            "add_bias_linear": (True, "biases on dense layers are not part of ChatGLM2"),
            "apply_residual_connection_post_layernorm": (
                True,
                "post-norm residuals are not part of ChatGLM2",
            ),
            "post_layer_norm": (False, "ChatGLM2 always has a final RMSNorm"),
            "tie_word_embeddings": (True, "ChatGLM2 has a separate output_layer"),
        }
        for key, (bad, why) in unsupported.items():
            if getattr(self, key) == bad:
                fail(key, f"unsupported: {why}")
        if self.pre_seq_len:
            fail("pre_seq_len", "unsupported: P-tuning v2 prefixes are not implemented")
        if self.quantization_bit not in (0, 4, 8):
            fail("quantization_bit", "must be 0 (none), 4 or 8")
        ratio = self.rope_ratio
        if ratio is not None:
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, (int, float))
                or not (math.isfinite(ratio) and ratio > 0)
            ):
                fail("rope_ratio", "must be a positive finite number")
