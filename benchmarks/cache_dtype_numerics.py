"""What a 16-bit KV cache does to the logits at an 8K context (docs/numerics.md).

    python benchmarks/cache_dtype_numerics.py [--model DIR] [--tokens 8192]

Runs the embedded default model (trained weights; its seq_length raised to --tokens, the rotary
table extends exactly) over a random prompt with a float32, a float16 and a bfloat16 cache, and
prints how far the last prompt position's logits and one decode step's logits move.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from glm_numpy import ChatGLM2
from glm_numpy.checkpoint import load_checkpoint
from glm_numpy.config import ChatGLM2Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    if args.model is None:
        from glm_numpy.assets import default_model_path

        args.model = default_model_path()
    config = ChatGLM2Config.from_json(f"{args.model}/config.json")
    config = dataclasses.replace(config, seq_length=max(config.seq_length, args.tokens))
    model = ChatGLM2(config, load_checkpoint(args.model))
    ids = np.random.default_rng(0).integers(100, 8000, args.tokens)
    logits = {}
    for dtype in ("float32", "float16", "bfloat16"):
        cache = model.new_cache(dtype)
        prompt = model.forward(ids[:-1], cache, last_only=True)[0]  # [V]
        logits[dtype] = prompt, model.forward(ids[-1:], cache)[0]
    for dtype in ("float16", "bfloat16"):
        for where, ours, reference in zip(("last prompt position", "decode step"), *[
            logits[dtype], logits["float32"]
        ]):  # fmt: skip
            moved = np.abs(ours - reference).max()
            top = len(set(np.argsort(-ours)[:10]) & set(np.argsort(-reference)[:10]))
            print(
                f"{dtype:>8}, {where}: max |d logit| {moved:.1e} "
                f"({moved / np.abs(reference).max():.1e} of the largest), "
                f"argmax same: {np.argmax(ours) == np.argmax(reference)}, top-10 overlap {top}"
            )


if __name__ == "__main__":
    main()
