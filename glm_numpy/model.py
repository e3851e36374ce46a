"""ChatGLM2: the layers composed into the forward pass (spec §3), with a KV cache and hooks.

    ids -> embedding -> L x block -> final RMSNorm -> output layer -> logits

    block(x) = x1 + MLP(RMSNorm(x1)),   x1 = x + SelfAttention(RMSNorm(x))     (pre-norm residuals)

Activations are float32; weights stay in their stored form (16-bit, memory-mapped, or quantised)
and are widened inside ``linear``. Rows of a batch run through the projections together (each
weight is read once per step for all rows) and through attention one by one.

Every intermediate passes a hook point (glm_numpy.hooks) on its way: a hook may watch or replace
it, and the trace is a hook that keeps them all. A pass with no hooks runs the fused kernels
(the same math, tested equal); a pass with hooks runs the readable layers, whose values it shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from glm_numpy import kernels
from glm_numpy.cache import KVCache
from glm_numpy.compute import check_compute, with_compute
from glm_numpy.config import ChatGLM2Config
from glm_numpy.hooks import Hook, apply_hooks, recorder, resolve_hooks
from glm_numpy.kernels.attention import attention_context
from glm_numpy.kernels.norm import fused_rms_norm
from glm_numpy.layers import apply_rotary, embedding, linear, lm_head, rms_norm, rotary_table
from glm_numpy.layers.attention import attend, attention_scores, masked_softmax
from glm_numpy.layers.swiglu import silu
from glm_numpy.quantize import QuantizedWeight

Trace = dict[str, np.ndarray]
# Tokens per prefill pass (ChatGLM2(prefill_chunk=...)): big enough for the projections' sgemm
# to run at full speed, small enough that a 32K prompt's activations stay a few hundred MB.
PREFILL_CHUNK = 512
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
        prefill_chunk: int | None = PREFILL_CHUNK,
        compute: str = "float32",
    ):
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or prefill_chunk < 1):
            raise ValueError(
                f"prefill_chunk={prefill_chunk!r}: expected a token count >= 1 or None"
            )
        self.config = config
        self.compute = compute  # arithmetic of 16-bit weights (glm_numpy.compute)
        self.weights = weights
        self.reference_fp16_rotary = reference_fp16_rotary
        self.prefill_chunk = prefill_chunk
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
    def from_pretrained(
        cls, directory: str | Path, family: str | None = None, progress: bool = False, **options
    ) -> ChatGLM2:
        """Open a checkpoint directory (config.json + safetensors or torch .bin shards).
        family ("chatglm2", "chatglm3", "codegeex2") decides what a -32K model's rope_ratio
        means when the directory does not show it (glm_numpy.family). progress=True: a bar on
        stderr should opening take over a second (glm_numpy.progress)."""
        from glm_numpy.checkpoint import load_checkpoint
        from glm_numpy.checkpoint.validate import validate_checkpoint

        config = ChatGLM2Config.from_json(Path(directory) / "config.json", family)
        checkpoint = load_checkpoint(directory, progress=progress)
        validate_checkpoint(checkpoint, config)
        return cls(config, checkpoint, **options)

    def _layer_weights(self, i: int) -> LayerWeights:
        prefix = f"transformer.encoder.layers.{i}."
        return layer_weights(self.weights, prefix, self.config.quantization_bit)

    def new_cache(self, dtype: str = "float32") -> KVCache:
        """An empty KV cache for one sequence (layout in glm_numpy.cache), stored as "float32",
        "float16" or "bfloat16" (half the memory; attention widens what it reads)."""
        c = self.config
        return KVCache(
            c.num_layers, c.num_kv_groups, c.head_dim, dtype=dtype, max_tokens=c.seq_length
        )

    # ------------------------------------------------------------------ forward pass
    def forward(
        self,
        input_ids: np.ndarray,
        cache: KVCache | None = None,
        trace: bool = False,
        hooks: Mapping[str, Hook] | None = None,
        last_only: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> np.ndarray | tuple[np.ndarray, Trace]:
        """input_ids [T] int -> logits [T, V] float32 ([1, V] with last_only).

        With a cache, the new tokens are appended to it and their positions continue from it.
        hooks {trace name or pattern: fn}: fn(array) sees that intermediate and may return a
        replacement of the same shape (glm_numpy.hooks). With trace=True, also returns
        {name: array} of every intermediate (after the hooks), in the order computed (a pass with
        hooks or a trace runs the prompt in one pass, whatever prefill_chunk says).
        progress(tokens), when given, hears of the work as it goes: T / L after each layer.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"input_ids must be a non-empty 1-D array of ids, got {ids.shape}")
        table = resolve_hooks(hooks or {}, self.config.num_layers)
        record: Trace = {}
        if trace:  # the trace is one more hook at every point, after the user's
            for name, keep in recorder(record, self.config.num_layers).items():
                table.setdefault(name, []).extend(keep)
        caches = [cache if cache is not None else self.new_cache()]
        is_token = np.ones((1, ids.size), dtype=bool)
        logits = self._forward(ids[None, :], is_token, caches, table, last_only, progress)
        return (logits[0], record) if trace else logits[0]

    def forward_batch(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        caches: list[KVCache],
        last_only: bool = False,
        hooks: Mapping[str, Hook] | None = None,
    ) -> np.ndarray:
        """input_ids [B, T], attention_mask [B, T] (0 = left padding), one cache per row
        -> logits [B, T, V] ([B, 1, V] with last_only). Padding is stored in the caches but never
        attended to, and does not advance positions (spec §5.4). Hooks as in forward, called
        once per row."""
        ids = np.asarray(input_ids)
        is_token = np.asarray(attention_mask).astype(bool)
        if ids.ndim != 2 or ids.shape != is_token.shape or len(caches) != ids.shape[0]:
            raise ValueError(
                f"input_ids {ids.shape}, attention_mask {is_token.shape} and {len(caches)} "
                "caches do not match: expected [B, T], [B, T] and B caches"
            )
        table = resolve_hooks(hooks or {}, self.config.num_layers)
        return self._forward(ids, is_token, caches, table, last_only)

    def _forward(
        self,
        ids: np.ndarray,
        is_token: np.ndarray,
        caches: list[KVCache],
        hooks: dict[str, list[Hook]],
        last_only: bool,
        progress: Callable[[float], None] | None = None,
    ) -> np.ndarray:
        """ids [B, T], is_token [B, T] -> logits [B, T or 1, V], through the resolved hooks.

        Chunked prefill: without hooks, a prompt longer than prefill_chunk runs through all
        layers prefill_chunk tokens at a time, each chunk appending to the caches before the
        next attends to them, so activations ([T, 2F] and the like) stay the size of one chunk.
        """
        T, limit = ids.shape[1], self.config.seq_length
        for cache in caches:
            if cache.length + T > limit:
                raise ValueError(
                    f"{cache.length} cached + {T} new tokens = {cache.length + T}, beyond this "
                    f"model's seq_length of {limit} tokens"
                )
            cache.make_room(T)  # at once, not by doubling chunk after chunk
        chunk = self.prefill_chunk
        if hooks or chunk is None or T <= chunk:
            return self._forward_pass(ids, is_token, caches, hooks, last_only, progress)
        logits = [
            self._forward_pass(
                ids[:, s : s + chunk],
                is_token[:, s : s + chunk],
                caches,
                hooks,
                last_only,
                progress,
            )
            for s in range(0, T, chunk)
        ]  # [B, chunk or 1, V] each
        return logits[-1] if last_only else np.concatenate(logits, axis=1)

    def _forward_pass(
        self,
        ids: np.ndarray,
        is_token: np.ndarray,
        caches: list[KVCache],
        hooks: dict[str, list[Hook]],
        last_only: bool,
        progress: Callable[[float], None] | None = None,
    ) -> np.ndarray:
        """_forward in one pass over all T tokens."""
        c = self.config
        positions = np.stack([cache.positions_for(m) for cache, m in zip(caches, is_token)])
        positions = apply_hooks(hooks, "positions", positions)  # [B, T]
        rotary = rotary_table(
            positions,
            c.rotary_dim,
            c.rotary_base,
            self.reference_fp16_rotary,
            c.rotary_position_divisor,  # rope_ratio, as the family applies it (config)
        )
        run = Pass.start(c, rotary, caches, is_token, hooks)
        x = run.see("embedding", embedding(ids, self.word_embeddings))  # [B, T, D]
        for i, w in enumerate(self.layers):
            x = transformer_block(run, i, w, x)
            if progress is not None:
                progress(ids.shape[1] / c.num_layers)
        h = rms_norm(x, self.final_layernorm, c.layernorm_epsilon)  # [B, T, D]
        h = run.see("final_layernorm", h)
        logits = lm_head(h, self.output_layer, last_only=last_only)  # [B, T, V]
        return run.see("logits", logits)

    # ------------------------------------------------------------------ chat (glm_numpy.generation)
    def chat(self, tokenizer, query: str, history=None, **sampling):
        """-> (response, history + [(query, response)]); see glm_numpy.generation.chat."""
        from glm_numpy.generation import chat

        return chat(self, tokenizer, query, history, **sampling)

    def stream_chat(self, tokenizer, query: str, history=None, **options):
        """Yield (partial response, history) per token; see glm_numpy.generation.stream_chat."""
        from glm_numpy.generation import stream_chat

        return stream_chat(self, tokenizer, query, history, **options)


@dataclasses.dataclass(frozen=True)
class Pass:
    """What every block of one forward pass shares, built once per call of forward."""

    config: ChatGLM2Config
    rotary: tuple[np.ndarray, np.ndarray]  # (cos, sin) [B, T, R/2]
    caches: list[KVCache]  # one per row
    slots: list[slice]  # per row: where the new tokens sit in its cache
    allowed: list[np.ndarray]  # per row: [T, S] which keys each new query may attend to
    hooks: dict[str, list[Hook]]  # hook point -> functions; empty: the fused fast path

    @classmethod
    def start(cls, config, rotary, caches, is_token, hooks) -> Pass:
        """Reserve the new tokens' slots (is_token [B, T]) in each row's cache."""
        slots = [cache.extend(m) for cache, m in zip(caches, is_token)]
        allowed = [attention_allowed(cache, s) for cache, s in zip(caches, slots)]
        return cls(config, rotary, caches, slots, allowed, hooks)

    @property
    def fused(self) -> bool:
        """No hook looks: run the fused kernels (the same math as the layers, tested equal)."""
        return not self.hooks

    def see(self, name: str, array: np.ndarray) -> np.ndarray:
        """array [B, ...] passes hook point `name`: -> it, or what the hooks replaced it with."""
        return apply_hooks(self.hooks, name, array) if self.hooks else array


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
    rotary = rotary_table(
        positions[None],
        config.rotary_dim,
        config.rotary_base,
        reference_fp16_rotary,
        config.rotary_position_divisor,
    )
    cache = KVCache(1, config.num_kv_groups, config.head_dim)
    run = Pass.start(config, rotary, [cache], np.ones((1, T), dtype=bool), hooks={})
    return transformer_block(run, 0, weights, x[None])[0]


def transformer_block(run: Pass, i: int, w: LayerWeights, x: np.ndarray) -> np.ndarray:
    """x [B, T, D] -> [B, T, D]: layer i's pre-norm attention and MLP, each with its residual."""
    eps = run.config.layernorm_epsilon
    name = f"layers.{i}"
    norm = fused_rms_norm if run.fused else rms_norm
    x = run.see(f"{name}.input", x)
    a = run.see(f"{name}.input_layernorm", norm(x, w.input_layernorm, eps))  # [B, T, D]
    attn = self_attention(run, i, w, a)  # [B, T, D]
    x1 = run.see(f"{name}.residual_attention", x + attn)  # [B, T, D]
    m = run.see(f"{name}.post_attention_layernorm", norm(x1, w.post_attention_layernorm, eps))
    gate, up = np.split(linear(m, w.dense_h_to_4h), 2, axis=-1)  # [B, T, F] each, gate first
    gate = run.see(f"{name}.mlp_gate", gate)
    up = run.see(f"{name}.mlp_up", up)
    act = run.see(f"{name}.mlp_act", silu(gate) * up)  # [B, T, F]
    mlp = run.see(f"{name}.mlp_output", linear(act, w.dense_4h_to_h))  # [B, T, D]
    return run.see(f"{name}.output", x1 + mlp)  # [B, T, D]


def self_attention(run: Pass, i: int, w: LayerWeights, a: np.ndarray) -> np.ndarray:
    """a [B, T, D] -> [B, T, D]: fused q|k|v projection, rotary, cache, GQA, dense."""
    c = run.config
    H, G, Dh = c.num_attention_heads, c.num_kv_groups, c.head_dim
    B, T, _ = a.shape
    name = f"layers.{i}.attention"
    qkv = linear(a, w.query_key_value, w.query_key_value_bias)  # [B, T, (H+2G)*Dh]
    q = run.see(f"{name}.q", qkv[..., : H * Dh].reshape(B, T, H, Dh))  # [B, T, H, Dh]
    k = run.see(f"{name}.k", qkv[..., H * Dh : (H + G) * Dh].reshape(B, T, G, Dh))  # [B,T,G,Dh]
    v = run.see(f"{name}.v", qkv[..., (H + G) * Dh :].reshape(B, T, G, Dh))  # [B, T, G, Dh]
    cos, sin = run.rotary
    q = run.see(f"{name}.q_rotary", apply_rotary(q, cos, sin))  # [B, T, H, Dh]
    k = run.see(f"{name}.k_rotary", apply_rotary(k, cos, sin))  # [B, T, G, Dh]
    context = np.empty((B, T, H, Dh), dtype=np.float32)
    for b, cache in enumerate(run.caches):
        cache.store(i, run.slots[b], k[b], v[b])  # keys are cached after rotary
        if run.fused and kernels.usable():  # no hooks: the same math fused (tested equal)
            keys, values = cache.stored_keys(i), cache.stored_values(i)  # [S, G, Dh] as stored
            context[b] = attention_context(q[b], keys, values, run.allowed[b])  # [T, H, Dh]
            continue
        keys, values = cache.keys(i), cache.values(i)  # [S, G, Dh] float32
        scores = run.see(f"{name}.scores", attention_scores(q[b], keys)[None])[0]  # [H, T, S]
        probs = masked_softmax(scores, run.allowed[b])  # [H, T, S]
        probs = run.see(f"{name}.probs", probs[None])[0]
        context[b] = attend(probs, values)  # [T, H, Dh]
    context = context.reshape(B, T, H * Dh)  # heads side by side, head h at h*Dh
    context = run.see(f"{name}.context", context)
    return run.see(f"{name}.output", linear(context, w.dense))  # [B, T, D]
