"""The exercises: for each, the signature students implement, its cases, the reference, how
outputs are compared, the known mistakes, and hints for patterns of failing cases.

All arrays are float32 unless marked int. Shape legend: T tokens · S cached + new · D hidden ·
H query heads · G kv groups · Dh head dim · R rotary dims (Dh/2) · F ffn · V vocab · N heads or
groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from glm_numpy.exercises import cases, references
from glm_numpy.exercises.compare import ArrayOutput, ArraysOutput, IdSetOutput
from glm_numpy.exercises.mistakes import MISTAKES, Mistake


@dataclasses.dataclass(frozen=True)
class Exercise:
    name: str
    signature: str  # what the student's function takes and returns
    make_cases: Callable[[], list[cases.Case]]
    reference: Callable
    output: ArrayOutput | ArraysOutput | IdSetOutput
    tag_hints: dict[str, str] = dataclasses.field(default_factory=dict)

    def mistakes(self) -> list[Mistake]:
        return MISTAKES[self.name]()


_LONG_POSITIONS = (
    "it fails only at positions beyond 2048: compute the rotary angles in float32 or float64 "
    "from the exact positions (float16 cannot hold them)"
)

EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in [
        Exercise(
            "embedding",
            "embedding(ids, table) -> [T, D]; ids [T] int, table [V, D]",
            cases.embedding_cases,
            references.embedding,
            ArrayOutput(atol=1e-6, rtol=1e-6),  # a row lookup is exact
        ),
        Exercise(
            "rms_norm",
            "rms_norm(x, weight, eps) -> [T, D]; x [T, D], weight [D], eps float",
            cases.rms_norm_cases,
            references.rms_norm,
            ArrayOutput(atol=1e-5, rtol=1e-4),
            {
                "eps": "it fails only where eps matters (large eps, tiny rows, a row of zeros): "
                "y = x / sqrt(mean(x²) + eps) * weight, with the eps you are given"
            },
        ),
        Exercise(
            "rotary",
            "rotary(x, positions) -> [T, N, Dh]; x [T, N, Dh], positions [T] int; base 10000, "
            "the first Dh/2 channels rotated as interleaved pairs (2i, 2i+1), the rest passed "
            "through",
            cases.rotary_cases,
            references.rotary,
            ArrayOutput(atol=2e-3, rtol=2e-3),  # a float32 table at position ~9000 is this close
            {"long": _LONG_POSITIONS},
        ),
        Exercise(
            "attention",
            "attention(q, k, v) -> [T, H, Dh]; q [T, H, Dh], k and v [S, G, Dh]; causal, the T "
            "queries are the last T of the S positions, head h uses group h // (H/G), scores "
            "scaled by 1/sqrt(Dh)",
            cases.attention_cases,
            references.attention,
            ArrayOutput(atol=1e-4, rtol=1e-3),
            {
                "large": "it fails only when the scores are large: subtract each row's maximum "
                "before exp() so that the softmax cannot overflow"
            },
        ),
        Exercise(
            "swiglu",
            "swiglu(x, w_h_to_4h, w_4h_to_h) -> [T, D]; x [T, D], w_h_to_4h [2F, D] (rows: gate "
            "then up), w_4h_to_h [D, F]",
            cases.swiglu_cases,
            references.swiglu,
            ArrayOutput(atol=1e-4, rtol=1e-3),
        ),
        Exercise(
            "lm_head",
            "lm_head(x, w) -> logits [T, V]; x [T, D], w [V, D]",
            cases.lm_head_cases,
            references.lm_head,
            ArrayOutput(atol=1e-4, rtol=1e-3),
        ),
        Exercise(
            "block",
            "block(x, positions, weights, num_heads, num_kv_groups, eps) -> [T, D]; x [T, D], "
            "positions [T] int, weights a dict of the block's 7 arrays under their official "
            "short names (input_layernorm.weight, self_attention.query_key_value.weight/.bias, "
            "self_attention.dense.weight, post_attention_layernorm.weight, "
            "mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight); Dh = "
            "weights['self_attention.dense.weight'].shape[1] // num_heads",
            cases.block_cases,
            references.block,
            ArrayOutput(atol=1e-3, rtol=1e-3),
            {
                "mlp_only": "the block is wrong even with the attention output weights at zero, "
                "where it is out = x + MLP(post_attention_layernorm(x)): check that "
                "both residuals add the block's input x (not its normalised "
                "version), then post_attention_layernorm and SwiGLU",
                "attention_only": "the attention half is wrong (the MLP half passes; this case "
                "has mlp.dense_4h_to_h at zero): check input_layernorm, the "
                "q|k|v split, rotary, grouped attention, dense and the first "
                "residual",
                "long": _LONG_POSITIONS,
            },
        ),
        Exercise(
            "kv_cache_step",
            "kv_cache_step(q, k, v, cache_k, cache_v) -> (out [1, H, Dh], cache_k [S+1, G, Dh], "
            "cache_v [S+1, G, Dh]); q [1, H, Dh], k and v [1, G, Dh] not yet rotated, cache_k and "
            "cache_v [S, G, Dh] for the S earlier tokens (keys already rotated); the new token "
            "is at position S",
            cases.kv_cache_step_cases,
            references.kv_cache_step,
            ArraysOutput(("out", "cache_k", "cache_v"), atol=1e-4, rtol=1e-3),
            {"long": _LONG_POSITIONS},
        ),
        Exercise(
            "top_p",
            "top_p(logits, p) -> set of ids; logits [V], 0 < p <= 1; the smallest set of most "
            "likely tokens whose probabilities add up to at least p",
            cases.top_p_cases,
            references.top_p,
            IdSetOutput(),
            {
                "large": "it fails only for large logits: subtract the maximum logit before exp() "
                "so that the softmax cannot overflow"
            },
        ),
    ]
}
