"""Where one 6B-sized layer's prefill time goes: matrix products, attention, and the rest.

    python benchmarks/prefill_profile.py --tokens 512 --format int4

Runs one transformer block at ChatGLM2-6B's sizes (random weights, no checkpoint needed, about
0.4 GB) over a prompt of --tokens tokens, step by step as ChatGLM2.forward does without a
trace, and prints each step's milliseconds (best of --repeats) and the share of the layer
outside the matrix products and attention: the norms, rotary, the cache, SwiGLU and the
residuals (issue 17's target: at most 10 % at 512 tokens).
"""

from __future__ import annotations

import argparse
import time

import glm_numpy  # noqa: F401  (sets the thread settings before numpy loads OpenBLAS)

# isort: split
import numpy as np

from glm_numpy.cache import KVCache
from glm_numpy.compute import BF16Compute
from glm_numpy.kernels.attention import attention_context
from glm_numpy.kernels.norm import fused_rms_norm
from glm_numpy.layers import apply_rotary, linear, rotary_table
from glm_numpy.layers.swiglu import swiglu_act
from glm_numpy.model import attention_allowed
from glm_numpy.quantize import quantize

D, F, H, G, Dh = 4096, 13696, 32, 2, 128  # ChatGLM2-6B
MATRICES = ("qkv", "dense", "up", "down")


def weight(rows: int, columns: int, fmt: str, rng):
    w = rng.standard_normal((rows, columns), dtype=np.float32) * 0.02
    if fmt == "fp16":
        return w.astype(np.float16)
    if fmt == "fp16-bf16-compute":
        return BF16Compute(w.astype(np.float16))
    bits, group = {"int8": (8, None), "int4": (4, None), "int4-g128": (4, 128)}[fmt]
    return quantize(w, bits, group)


def layer_steps(x, w, T) -> dict[str, float]:
    """One block over x [1, T, D]: seconds per step."""
    seconds: dict[str, float] = {}

    def timed(name, function, *args):
        start = time.perf_counter()
        result = function(*args)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return result

    cache = KVCache(1, G, Dh)
    slots = cache.extend(np.ones(T, dtype=bool))
    allowed = attention_allowed(cache, slots)
    cos, sin = rotary_table(np.arange(T)[None], Dh // 2)
    a = timed("norms", fused_rms_norm, x, w["norm"], 1e-5)
    qkv = timed("qkv", linear, a, w["qkv"])
    q = qkv[..., : H * Dh].reshape(1, T, H, Dh)
    k = qkv[..., H * Dh : (H + G) * Dh].reshape(1, T, G, Dh)
    v = qkv[..., (H + G) * Dh :].reshape(1, T, G, Dh)
    q, k = timed("rotary", apply_rotary, q, cos, sin), timed("rotary", apply_rotary, k, cos, sin)
    timed("cache", cache.store, 0, slots, k[0], v[0])
    context = timed("attention", attention_context, q[0], cache.keys(0), cache.values(0), allowed)
    x1 = timed(
        "residuals", np.add, x, timed("dense", linear, context.reshape(1, T, -1), w["dense"])
    )
    m = timed("norms", fused_rms_norm, x1, w["norm"], 1e-5)
    _, _, act = timed("swiglu", swiglu_act, timed("up", linear, m, w["up"]))
    timed("residuals", np.add, x1, timed("down", linear, act, w["down"]))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument(
        "--format",
        default="int4",
        choices=["fp16", "fp16-bf16-compute", "int8", "int4", "int4-g128"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = {
        "qkv": weight((H + 2 * G) * Dh, D, args.format, rng),
        "dense": weight(D, H * Dh, args.format, rng),
        "up": weight(2 * F, D, args.format, rng),
        "down": weight(D, F, args.format, rng),
        "norm": np.ones(D, dtype=np.float16),
    }
    x = rng.standard_normal((1, args.tokens, D), dtype=np.float32)
    runs = [layer_steps(x, w, args.tokens) for _ in range(args.repeats)]
    best = {name: min(run[name] for run in runs) for name in runs[0]}
    total = sum(best.values())
    matrices = sum(best[name] for name in MATRICES)
    rest = total - matrices - best["attention"]
    print(f"{args.format}, {args.tokens} tokens, one layer: {1e3 * total:.0f} ms")
    for name, seconds in best.items():
        print(f"  {name:10s} {1e3 * seconds:8.1f} ms  {100 * seconds / total:5.1f} %")
    print(
        f"matrix products {100 * matrices / total:.1f} %, attention "
        f"{100 * best['attention'] / total:.1f} %, everything else {100 * rest / total:.1f} %"
    )


if __name__ == "__main__":
    main()
