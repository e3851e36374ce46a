"""Compile every kernel ahead of time, so that no later command waits for numba.

numba compiles a kernel the first time it is called with new argument types, then keeps the
machine code in its on-disk cache (``cache=True``): ``__pycache__`` beside
``glm_numpy/kernels/``, or, where that folder is read-only, numba's per-user cache directory;
``NUMBA_CACHE_DIR`` moves it anywhere. The first command after an install therefore spends a few
seconds compiling (the CLI says so once), and later ones load the cache in a fraction of a
second. ``glm-numpy warmup`` pays that cost up front: it runs a prefill and decode steps through
the embedded default model in each weight format a checkpoint can have (float16, bfloat16,
int8, int4 per row and per group), written as real checkpoints so that the arrays have exactly
the types a loaded checkpoint gives the kernels (read-only memory maps).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from glm_numpy.kernels.compilation import on_first_compilation

PROMPT_TOKENS = 16  # more than the decode kernels' row limit: the prefill path runs too
DECODE_STEPS = 2


def weight_formats(default_model: Path, work: Path) -> dict[str, Path]:
    """format name -> a checkpoint directory of the default model in that format."""
    from glm_numpy.checkpoint.convert import convert_checkpoint
    from glm_numpy.checkpoint.quantize import quantize_checkpoint

    formats = {"float16": default_model}
    formats["bfloat16"] = convert_checkpoint(
        default_model, work / "bfloat16", dtype="bfloat16", progress=False
    )
    for name, bits, group_size in [("int8", 8, None), ("int4", 4, None), ("int4-g16", 4, 16)]:
        formats[name] = quantize_checkpoint(
            default_model, work / name, bits, group_size, progress=False
        )
    return formats


def run_once(directory: Path) -> None:
    """A prefill of PROMPT_TOKENS and DECODE_STEPS decode steps through the model in directory."""
    from glm_numpy.model import ChatGLM2

    model = ChatGLM2.from_pretrained(directory)
    cache = model.new_cache()
    ids = np.arange(PROMPT_TOKENS) % model.config.padded_vocab_size
    model.forward(ids, cache, last_only=True)
    for step in range(DECODE_STEPS):
        model.forward(np.array([step]), cache, last_only=True)


def warmup(report: Callable[[str], None] = print) -> dict[str, float]:
    """Run every weight format once -> {format: seconds}; report(line) after each."""
    from glm_numpy.assets import default_model_path

    compiled = []
    on_first_compilation(lambda: compiled.append(True))
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="glm-numpy-warmup-") as work:
        for name, directory in weight_formats(default_model_path(), Path(work)).items():
            started = time.perf_counter()
            run_once(directory)
            seconds[name] = time.perf_counter() - started
            report(f"{name:>9}: {seconds[name]:.2f} s")
    report("kernels compiled and cached" if compiled else "kernels were already cached")
    return seconds
