"""The inputs each exercise is checked on: seeded random arrays, small enough to run in
milliseconds, chosen so that every mistake in ``mistakes.py`` changes the answer on at least one
of them — G < H with 1 < G, T < S, positions beyond 2048, scores large enough to overflow exp(),
rows small enough that eps matters, odd sizes.

Each case has a label (shown to the student), its arguments in the student's signature, and tags
that ``diagnose`` uses to interpret a pattern of failures (e.g. wrong only on "large" cases).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from glm_numpy.exercises.compare import describe


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    args: tuple
    names: tuple[str, ...]
    tags: frozenset[str] = frozenset()

    def describe_inputs(self) -> str:
        """'x [4, 2, 16] float32, positions [4] int64 = [0 2047 2048 5000]'"""
        parts = []
        for name, value in zip(self.names, self.args):
            if isinstance(value, dict):
                parts.append(f"{name} {{{len(value)} arrays}}")
            elif isinstance(value, np.ndarray) and value.dtype.kind in "iu" and value.size <= 8:
                parts.append(f"{name} {describe(value)} = {value.tolist()}")
            elif isinstance(value, np.ndarray):
                parts.append(f"{name} {describe(value)}")
            else:
                parts.append(f"{name} = {value!r}")
        return ", ".join(parts)


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def embedding_cases() -> list[Case]:
    rng = np.random.default_rng(101)
    names = ("ids", "table")
    table = _normal(rng, 50, 12)
    return [
        Case("repeated ids (V=7, D=5)", (np.array([3, 0, 6, 3]), _normal(rng, 7, 5)), names),
        Case("one token (V=9, D=4)", (np.array([8]), _normal(rng, 9, 4)), names),
        Case("first and last rows (V=50, D=12)", (np.array([0, 49, 17, 5, 0, 33]), table), names),
    ]


def rms_norm_cases() -> list[Case]:
    rng = np.random.default_rng(202)
    names = ("x", "weight", "eps")
    zero_row = _normal(rng, 3, 7)
    zero_row[1] = 0.0
    return [
        Case("T=3, D=8, eps=1e-5", (_normal(rng, 3, 8), _normal(rng, 8), 1e-5), names),
        Case(
            "rows with a large mean (T=4, D=6)",
            (_normal(rng, 4, 6) + 3, _normal(rng, 6), 1e-5),
            names,
        ),
        Case(
            "large eps=0.5 (T=2, D=10)",
            (_normal(rng, 2, 10), _normal(rng, 10), 0.5),
            names,
            frozenset({"eps"}),
        ),
        Case(
            "tiny rows, |x| ~ 1e-3, eps=1e-5 (T=3, D=16)",
            (_normal(rng, 3, 16, scale=1e-3), _normal(rng, 16), 1e-5),
            names,
            frozenset({"eps"}),
        ),
        Case(
            "a row of zeros, odd D=7, eps=1e-6",
            (zero_row, _normal(rng, 7), 1e-6),
            names,
            frozenset({"eps"}),
        ),
    ]


def rotary_cases() -> list[Case]:
    rng = np.random.default_rng(303)
    names = ("x", "positions")
    return [
        Case("positions 0..2 (T=3, N=2, Dh=8)", (_normal(rng, 3, 2, 8), np.arange(3)), names),
        Case(
            "scattered positions (T=4, N=1, Dh=16)",
            (_normal(rng, 4, 1, 16), np.array([5, 17, 3, 100])),
            names,
        ),
        Case(
            "positions beyond 2048 (T=5, N=3, Dh=12)",
            (_normal(rng, 5, 3, 12), np.array([2047, 2048, 2049, 4097, 9001])),
            names,
            frozenset({"long"}),
        ),
        Case(
            "ChatGLM2's head size (T=2, N=2, Dh=128)",
            (_normal(rng, 2, 2, 128), np.array([7, 1000])),
            names,
        ),
    ]


def attention_cases() -> list[Case]:
    rng = np.random.default_rng(404)
    names = ("q", "k", "v")

    def qkv(T, S, H, G, Dh):
        return _normal(rng, T, H, Dh), _normal(rng, S, G, Dh), _normal(rng, S, G, Dh)

    # Large scores: every q and k close to one direction u, so every score is ~1600 (exp()
    # overflows even in float64) while the differences between scores stay of order 1.
    u = np.full(16, 0.25, dtype=np.float32)  # |u| = 1
    q_large = (80 * u + _normal(rng, 4, 2, 16, scale=0.1)).astype(np.float32)
    k_large = (80 * u + _normal(rng, 4, 1, 16, scale=0.1)).astype(np.float32)
    return [
        Case("T=S=4, H=G=2, Dh=8", qkv(4, 4, 2, 2, 8), names),
        Case("grouped heads: T=S=5, H=6, G=2, Dh=8", qkv(5, 5, 6, 2, 8), names),
        Case(
            "one new query after 6 cached keys: T=1, S=7, H=4, G=2, Dh=16",
            qkv(1, 7, 4, 2, 16),
            names,
            frozenset({"decode"}),
        ),
        Case(
            "3 new queries after 5 cached: T=3, S=8, H=8, G=4, odd Dh=5", qkv(3, 8, 8, 4, 5), names
        ),
        Case("one kv group for all heads: T=S=3, H=4, G=1, Dh=4", qkv(3, 3, 4, 1, 4), names),
        Case(
            "large scores (~1600, exp() overflows): T=S=4, H=2, G=1, Dh=16",
            (q_large, k_large, _normal(rng, 4, 1, 16)),
            names,
            frozenset({"large"}),
        ),
    ]


def swiglu_cases() -> list[Case]:
    rng = np.random.default_rng(505)
    names = ("x", "w_h_to_4h", "w_4h_to_h")

    def case(T, D, F):
        return _normal(rng, T, D), _normal(rng, 2 * F, D, scale=0.5), _normal(rng, D, F)

    return [
        Case("T=3, D=6, F=5", case(3, 6, 5), names),
        Case("one token, D=8, F=4", case(1, 8, 4), names),
        Case("odd sizes T=5, D=7, F=3", case(5, 7, 3), names),
    ]


def lm_head_cases() -> list[Case]:
    rng = np.random.default_rng(606)
    names = ("x", "w")
    return [
        Case("square weight T=2, D=V=6", (_normal(rng, 2, 6), _normal(rng, 6, 6)), names),
        Case("T=3, D=5, V=11", (_normal(rng, 3, 5), _normal(rng, 11, 5)), names),
        Case("one token, D=4, V=9", (_normal(rng, 1, 4), _normal(rng, 9, 4)), names),
    ]


BLOCK_WEIGHT_NAMES = (
    "input_layernorm.weight",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "self_attention.dense.weight",
    "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def block_weights(rng: np.random.Generator, D: int, H: int, G: int, Dh: int, F: int) -> dict:
    """Random weights of one block under the official short names (shapes in the docstring of
    ``references.block``)."""
    qkv_rows = (H + 2 * G) * Dh
    return {
        "input_layernorm.weight": (1 + _normal(rng, D, scale=0.1)).astype(np.float32),
        "self_attention.query_key_value.weight": _normal(rng, qkv_rows, D, scale=D**-0.5),
        "self_attention.query_key_value.bias": _normal(rng, qkv_rows, scale=0.2),
        "self_attention.dense.weight": _normal(rng, D, H * Dh, scale=(H * Dh) ** -0.5),
        "post_attention_layernorm.weight": (1 + _normal(rng, D, scale=0.1)).astype(np.float32),
        "mlp.dense_h_to_4h.weight": _normal(rng, 2 * F, D, scale=D**-0.5),
        "mlp.dense_4h_to_h.weight": _normal(rng, D, F, scale=F**-0.5),
    }


def block_cases() -> list[Case]:
    """The first two cases switch one half of the block off (its output weights are zero), so
    that the first failing case already says which half is wrong."""
    rng = np.random.default_rng(707)
    names = ("x", "positions", "weights", "num_heads", "num_kv_groups", "eps")
    D, H, G, Dh, F = 16, 4, 2, 8, 12
    no_attention = block_weights(rng, D, H, G, Dh, F)
    no_attention["self_attention.dense.weight"][:] = 0
    no_mlp = block_weights(rng, D, H, G, Dh, F)
    no_mlp["mlp.dense_4h_to_h.weight"][:] = 0
    return [
        Case(
            "MLP half only: self_attention.dense.weight is zero (T=3)",
            (_normal(rng, 3, D), np.arange(3), no_attention, H, G, 1e-5),
            names,
            frozenset({"mlp_only"}),
        ),
        Case(
            "attention half only: mlp.dense_4h_to_h.weight is zero (T=4)",
            (_normal(rng, 4, D), np.arange(4), no_mlp, H, G, 1e-5),
            names,
            frozenset({"attention_only"}),
        ),
        Case(
            "whole block, T=4, D=16, H=4, G=2, Dh=8, F=12",
            (_normal(rng, 4, D), np.arange(4), block_weights(rng, D, H, G, Dh, F), H, G, 1e-5),
            names,
        ),
        # Rotary only sees position differences here (there is no cache), but a float16
        # table is wrong in absolute terms at these positions.
        Case(
            "whole block at positions 2500..2502, H=6, G=3, D=12",
            (
                _normal(rng, 3, 12),
                np.arange(2500, 2503),
                block_weights(rng, 12, 6, 3, 8, 10),
                6,
                3,
                1e-5,
            ),
            names,
            frozenset({"long"}),
        ),
    ]


def kv_cache_step_cases() -> list[Case]:
    rng = np.random.default_rng(808)
    names = ("q", "k", "v", "cache_k", "cache_v")

    def case(S, H, G, Dh):
        return (
            _normal(rng, 1, H, Dh),
            _normal(rng, 1, G, Dh),
            _normal(rng, 1, G, Dh),
            _normal(rng, S, G, Dh),
            _normal(rng, S, G, Dh),
        )

    return [
        Case("S=4 cached, H=4, G=2, Dh=8", case(4, 4, 2, 8), names),
        Case("first token: empty cache, H=2, G=1, Dh=8", case(0, 2, 1, 8), names),
        Case("S=6 cached, H=6, G=3, Dh=12", case(6, 6, 3, 12), names),
        Case(
            "S=2500 cached (position beyond 2048), H=4, G=2, Dh=8",
            case(2500, 4, 2, 8),
            names,
            frozenset({"long"}),
        ),
    ]


def top_p_cases() -> list[Case]:
    rng = np.random.default_rng(909)
    names = ("logits", "p")
    peaked = _normal(rng, 12)
    peaked[4] = 8.0  # one token holds > 99% of the probability
    spread = _normal(rng, 40, scale=2.0)
    return [
        Case("V=10, p=0.5", (_normal(rng, 10, scale=1.5), 0.5), names),
        Case("V=40, p=0.9", (spread, 0.9), names),
        Case("one token above p: V=12, p=0.8", (peaked, 0.8), names),
        Case("p=1 keeps every token: V=6", (_normal(rng, 6), 1.0), names),
        Case("flat distribution, p=0.3: V=20", (_normal(rng, 20, scale=0.3), 0.3), names),
        Case(
            "large logits (~1000, exp() overflows): V=40, p=0.9",
            ((spread + 1000).astype(np.float32), 0.9),
            names,
            frozenset({"large"}),
        ),
    ]
