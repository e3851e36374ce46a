"""ChatGLM2: the layers composed into the forward pass (spec §3), with a KV cache and a trace.

    ids -> embedding -> L x block -> final RMSNorm -> output layer -> logits

    block(x) = x1 + MLP(RMSNorm(x1)),   x1 = x + SelfAttention(RMSNorm(x))     (pre-norm residuals)

Activations are float32; weights stay in their stored form (16-bit, memory-mapped, or quantised)
and are widened inside ``linear``. Rows of a batch run through the projections together (each
weight is read once per step for all rows) and through attention one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from glm_numpy import kernels
from glm_numpy.cache import KVCache
from glm_numpy.compute import check_compute, with_compute
from glm_numpy.config import ChatGLM2Config
from glm_numpy.kernels.attention import attention_context
from glm_numpy.kernels.norm import fused_rms_norm
from glm_numpy.layers import apply_rotary, embedding, linear, lm_head, rms_norm, rotary_table
from glm_numpy.layers.attention import attend, attention_scores, masked_softmax
from glm_numpy.layers.swiglu import swiglu_act
from glm_numpy.quantize import QuantizedWeight

Trace = dict[str, np.ndarray]
LINEAR = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # LayerWeights' matrices


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One block's weights under their official short names (spec §2.2)."""

    input_layernorm: np.ndarray  # [D]
    query_key_value: np.ndarray | QuantizedWeight  # [(H+2G)*Dh, D]
    query_key_value_bias: np.ndarray | None  # [(H+2G)*Dh]
    dense: np.ndarray | QuantizedWeight  # [D, H*Dh]
    post_attention_layernorm: np.ndarray  # [D]
    dense_h_to_4h: np.ndarray | QuantizedWeight  # [2F, D]
    dense_4h_to_h: np.ndarray | QuantizedWeight  # [D, F]


class ChatGLM2:
    """The ChatGLM2 forward pass over a mapping of official tensor names to arrays."""

    def __init__(
        self,
        config: ChatGLM2Config,
        weights: Mapping[str, np.ndarray],
        reference_fp16_rotary: bool = False,
        compute: str = "float32",
    ):
        self.config = config
        self.compute = compute  # arithmetic of 16-bit weights (glm_numpy.compute)
        self.weights = weights
        self.reference_fp16_rotary = reference_fp16_rotary
        self.word_embeddings = weights["transformer.embedding.word_embeddings.weight"]  # [V, D]
        self.layers = [self._layer_weights(i) for i in range(config.num_layers)]
        self.final_layernorm = weights["transformer.encoder.final_layernorm.weight"]  # [D]
        bits = config.quantization_bit
        self.output_layer = linear_weight(weights, "transformer.output_layer", bits)  # [V, D]
        if check_compute(compute):  # bf16: 16-bit weights multiplied in bfloat16
            self.layers = [
                dataclasses.replace(w, **{f: with_compute(getattr(w, f), True) for f in LINEAR})
                for w in self.layers
            ]
            self.output_layer = with_compute(self.output_layer, True)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **options) -> ChatGLM2:
        """Open a checkpoint directory (config.json + safetensors or torch .bin shards)."""
        from glm_numpy.checkpoint import load_checkpoint
        from glm_numpy.checkpoint.validate import validate_checkpoint

        config = ChatGLM2Config.from_json(Path(directory) / "config.json")
        checkpoint = load_checkpoint(directory)
        validate_checkpoint(checkpoint, config)
        return cls(config, checkpoint, **options)

    def _layer_weights(self, i: int) -> LayerWeights:
        prefix = f"transformer.encoder.layers.{i}."
        return layer_weights(self.weights, prefix, self.config.quantization_bit)

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence (layout in glm_numpy.cache)."""
        c = self.config
        return KVCache(c.num_layers, c.num_kv_groups, c.head_dim)

    # ------------------------------------------------------------------ forward pass
    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache | None = None,
        trace: bool = False,
        last_only: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, Trace]:
        """input_ids [T] int -> logits [T, V] float32 ([1, V] with last_only).

        With a cache, the new tokens are appended to it and their positions continue from it.
        With trace=True, also returns {name: array} of every intermediate, in the order computed.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D array of ids, got {ids.shape}")
        record: Trace | None = {} if trace else None
        caches = [cache if cache is not None else self.new_cache()]
        is_token = np.ones((1, ids.size), dtype=bool)
        logits = self._forward(ids[None, :], is_token, caches, record, last_only)
        return (logits[0], record) if trace else logits[0]

    def forward_batch(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        caches: list[KVCache],
        last_only: bool = False,
    ) -> np.ndarray:
        """input_ids [B, T], attention_mask [B, T] (0 = left padding), one cache per row
        -> logits [B, T, V] ([B, 1, V] with last_only). Padding is stored in the caches but never
        attended to, and does not advance positions (spec §5.4)."""
        ids = np.asarray(input_ids)
        is_token = np.asarray(attention_mask).astype(bool)
        if ids.ndim != 2 or ids.shape != is_token.shape or len(caches) != ids.shape[0]:
            raise ValueError(
                f"input_ids {ids.shape}, attention_mask {is_token.shape} and {len(caches)} "
                "caches do not match: expected [B, T], [B, T] and B caches"
            )
        return self._forward(ids, is_token, caches, None, last_only)

    def _forward(
        self,
        ids: np.ndarray,
        is_token: np.ndarray,
        caches: list[KVCache],
        record: Trace | None,
        last_only: bool,
    ) -> np.ndarray:
        """ids [B, T], is_token [B, T] -> logits [B, T or 1, V]; trace (row 0) into record."""
        c = self.config
        positions = np.stack([cache.positions_for(m) for cache, m in zip(caches, is_token)])
        cos, sin = rotary_table(positions, c.rotary_dim, reference_fp16=self.reference_fp16_rotary)
        slots = [cache.extend(m) for cache, m in zip(caches, is_token)]
        allowed = [attention_allowed(cache, s) for cache, s in zip(caches, slots)]  # [T, S] each

        def keep(name: str, array: np.ndarray) -> None:
            record[name] = array[0]

        keep = _skip if record is None else keep  # _skip: no trace, fast attention kernel

        keep("positions", positions)
        x = embedding(ids, self.word_embeddings)  # [B, T, D]
        keep("embedding", x)
        for i, w in enumerate(self.layers):
            x = transformer_block(c, i, w, x, (cos, sin), caches, slots, allowed, keep)
        h = rms_norm(x, self.final_layernorm, c.layernorm_epsilon)  # [B, T, D]
        keep("final_layernorm", h)
        logits = lm_head(h, self.output_layer, last_only=last_only)  # [B, T, V]
        keep("logits", logits)
        return logits

    # ------------------------------------------------------------------ chat (glm_numpy.generation)
    def chat(self, tokenizer, query: str, history=None, **sampling):
        """-> (response, history + [(query, response)]); see glm_numpy.generation.chat."""
        from glm_numpy.generation import chat

        return chat(self, tokenizer, query, history, **sampling)

    def stream_chat(self, tokenizer, query: str, history=None, **options):
        """Yield (partial response, history) per token; see glm_numpy.generation.stream_chat."""
        from glm_numpy.generation import stream_chat

        return stream_chat(self, tokenizer, query, history, **options)


def attention_allowed(cache: KVCache, slots: slice) -> np.ndarray:
    """-> allowed [T, S]: causal over the cache's slots, never into left padding. A padding query
    may still see itself, so its (unused) softmax row is never empty."""
    S = cache.length
    query_slot = np.arange(slots.start, slots.stop)[:, None]  # [T, 1]
    key_slot = np.arange(S)[None, :]  # [1, S]
    return ((key_slot <= query_slot) & cache.is_token[None, :]) | (key_slot == query_slot)


def linear_weight(weights: Mapping[str, np.ndarray], module: str, bits: int):
    """``<module>.weight`` [O, I], paired with ``<module>.weight_scale`` when it is quantised."""
    weight = weights[f"{module}.weight"]
    scale = weights.get(f"{module}.weight_scale")
    if scale is None:
        return weight
    in_features = weight.shape[1] * (2 if bits == 4 else 1)
    # A 1-D scale is the official one-per-row scheme; a 2-D one holds a scale per group.
    group_size = None if scale.ndim == 1 else in_features // scale.shape[1]
    return QuantizedWeight(weight, scale, bits, group_size)


def layer_weights(weights: Mapping[str, np.ndarray], prefix: str = "", bits: int = 0):
    """One block's weights from a mapping that uses the official names after ``prefix``
    (e.g. "transformer.encoder.layers.3." in a checkpoint, "" for a dict of short names)."""
    attn, mlp = f"{prefix}self_attention", f"{prefix}mlp"
    return LayerWeights(
        input_layernorm=weights[f"{prefix}input_layernorm.weight"],
        query_key_value=linear_weight(weights, f"{attn}.query_key_value", bits),
        query_key_value_bias=weights.get(f"{attn}.query_key_value.bias"),
        dense=linear_weight(weights, f"{attn}.dense", bits),
        post_attention_layernorm=weights[f"{prefix}post_attention_layernorm.weight"],
        dense_h_to_4h=linear_weight(weights, f"{mlp}.dense_h_to_4h", bits),
        dense_4h_to_h=linear_weight(weights, f"{mlp}.dense_4h_to_h", bits),
    )


def block(
    x: np.ndarray,
    weights: LayerWeights,
    config: ChatGLM2Config,
    positions: np.ndarray | None = None,
    reference_fp16_rotary: bool = False,
) -> np.ndarray:
    """One transformer block over a whole sequence without a cache: x [T, D] -> [T, D].

    The same computation as inside ``ChatGLM2.forward`` (it calls the same function), for
    notebooks and exercises that look at a single block. positions [T] default to 0..T-1.
    """
    T = x.shape[0]
    positions = np.arange(T) if positions is None else np.asarray(positions)
    rotary = rotary_table(positions[None], config.rotary_dim, reference_fp16=reference_fp16_rotary)
    cache = KVCache(1, config.num_kv_groups, config.head_dim)
    slots = cache.extend(np.ones(T, dtype=bool))
    allowed = [attention_allowed(cache, slots)]
    out = transformer_block(config, 0, weights, x[None], rotary, [cache], [slots], allowed, _skip)
    return out[0]


def _skip(name: str, array: np.ndarray) -> None:
    """A trace recorder that keeps nothing."""


def transformer_block(config, i, w: LayerWeights, x, rotary, caches, slots, allowed, keep):
    """x [B, T, D] -> [B, T, D]: pre-norm attention and MLP, each with its residual.

    i is the layer index (in the caches and the trace names); rotary = (cos, sin) [B, T, R/2];
    caches/slots/allowed: per row, the KV cache, its new slots and the [T, S] attention mask;
    keep(name, array) records intermediates for the trace.
    """
    c = config
    name = f"layers.{i}"
    norm = fused_rms_norm if keep is _skip else rms_norm  # no trace: the same math, fused
    keep(f"{name}.input", x)
    a = norm(x, w.input_layernorm, c.layernorm_epsilon)  # [B, T, D]
    keep(f"{name}.input_layernorm", a)
    attn = self_attention(config, i, w, a, rotary, caches, slots, allowed, keep)  # [B, T, D]
    x1 = x + attn  # [B, T, D]
    keep(f"{name}.residual_attention", x1)
    m = norm(x1, w.post_attention_layernorm, c.layernorm_epsilon)  # [B, T, D]
    keep(f"{name}.post_attention_layernorm", m)
    u = linear(m, w.dense_h_to_4h)  # [B, T, 2F]
    gate, up, act = swiglu_act(u)  # [B, T, F] each
    keep(f"{name}.mlp_gate", gate)
    keep(f"{name}.mlp_up", up)
    keep(f"{name}.mlp_act", act)
    mlp = linear(act, w.dense_4h_to_h)  # [B, T, D]
    keep(f"{name}.mlp_output", mlp)
    out = x1 + mlp  # [B, T, D]
    keep(f"{name}.output", out)
    return out


def self_attention(config, i, w: LayerWeights, a, rotary, caches, slots, allowed, keep):
    """a [B, T, D] -> [B, T, D]: fused q|k|v projection, rotary, cache, GQA, dense."""
    c = config
    H, G, Dh = c.num_attention_heads, c.num_kv_groups, c.head_dim
    B, T, _ = a.shape
    name = f"layers.{i}.attention"
    qkv = linear(a, w.query_key_value, w.query_key_value_bias)  # [B, T, (H+2G)*Dh]
    q = qkv[..., : H * Dh].reshape(B, T, H, Dh)  # [B, T, H, Dh]
    k = qkv[..., H * Dh : (H + G) * Dh].reshape(B, T, G, Dh)  # [B, T, G, Dh]
    v = qkv[..., (H + G) * Dh :].reshape(B, T, G, Dh)  # [B, T, G, Dh]
    keep(f"{name}.q", q)
    keep(f"{name}.k", k)
    keep(f"{name}.v", v)
    cos, sin = rotary
    q = apply_rotary(q, cos, sin)  # [B, T, H, Dh]
    k = apply_rotary(k, cos, sin)  # [B, T, G, Dh]
    keep(f"{name}.q_rotary", q)
    keep(f"{name}.k_rotary", k)
    context = np.empty((B, T, H, Dh), dtype=np.float32)
    for b, cache in enumerate(caches):
        cache.store(i, slots[b], k[b], v[b])  # keys are cached after rotary
        keys, values = cache.keys(i), cache.values(i)  # [S, G, Dh]
        if keep is _skip and kernels.usable():  # no trace: the same math fused (tested equal)
            context[b] = attention_context(q[b], keys, values, allowed[b])  # [T, H, Dh]
            continue
        scores = attention_scores(q[b], keys)  # [H, T, S]
        probs = masked_softmax(scores, allowed[b])  # [H, T, S]
        context[b] = attend(probs, values)  # [T, H, Dh]
        if b == 0:
            keep(f"{name}.scores", scores[None])
            keep(f"{name}.probs", probs[None])
    context = context.reshape(B, T, H * Dh)  # heads side by side, head h at h*Dh
    keep(f"{name}.context", context)
    out = linear(context, w.dense)  # [B, T, D]
    keep(f"{name}.output", out)
    return out
