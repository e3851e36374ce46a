"""llama.cpp beside glm_numpy in the benchmark: the same weights, exported to GGUF, same figures.

    gguf_file(checkpoints, "q8_0", tokenizer)   CHECKPOINTS/6b-q8_0.gguf, exported once from
                                                the fp16 checkpoint and kept next to it
    run_llamacpp(path, ...)                     decode, prefill 16/128/512, peak RSS... (in its
                                                own subprocess, as bench.py runs every format)
    ratios(results)                             glm_numpy / llama.cpp per weight width

llama.cpp runs through llama-cpp-python (the ``llamacpp`` extra) with 2 threads; its prompt is
the same random ids as glm_numpy's. Its f16 KV cache and its own kernels are llama.cpp's
defaults; what it reads per decoded token is the GGUF's tensors but the embedding.
"""

from __future__ import annotations

import time
from pathlib import Path

# glm_numpy format -> the GGUF type of the same width (int4 group-wise compares with q4_0 too:
# llama.cpp's q4_0 has one scale per 32 weights).
SAME_WIDTH = {"fp16": "f16", "bf16": "f16", "int8": "q8_0", "int4": "q4_0", "int4-g128": "q4_0"}
GGUF_SOURCE = "6b-safetensors"  # the fp16 checkpoint every GGUF is exported from
THREADS = 2


def gguf_file(checkpoints: Path, type: str, tokenizer: Path) -> Path:
    """CHECKPOINTS/6b-<type>.gguf, exported from the fp16 checkpoint if it is not there yet."""
    from glm_numpy.export import write_gguf

    path = checkpoints / f"6b-{type}.gguf"
    if not path.exists():
        write_gguf(checkpoints / GGUF_SOURCE, path, type, tokenizer=tokenizer)
    return path


def run_llamacpp(path: Path, prompts, prompt_ids, timed_decode, measure) -> dict:
    """One GGUF file: the fields bench.measurements gives for glm_numpy, through ``measure``.

    prompt_ids(vocab), timed_decode(decode_one) and measure(bandwidth, first_token, steps,
    prefill, weights, config) are bench.py's, so both runtimes see the same prompt, are timed
    the same way and report the same fields.
    """
    import llama_cpp

    from glm_numpy.config import ChatGLM2Config

    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=2 * max(prompts),
        n_batch=max(prompts),
        n_ubatch=max(prompts),
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )
    ids = [int(i) for i in prompt_ids(llm.n_vocab())]
    llm.eval(ids[:16])
    first_token = time.perf_counter() - start

    def decode(t: int) -> None:
        llm.eval(ids[t : t + 1])

    steps, bandwidth = timed_decode(decode)
    prefill = {}
    for n in prompts:
        llm.reset()  # the next eval starts at position 0: a fresh cache, as new_cache()
        step = time.perf_counter()
        llm.eval(ids[:n])
        prefill[n] = n / (time.perf_counter() - step)
    config = ChatGLM2Config.from_json(path.parent / GGUF_SOURCE / "config.json")
    return measure(bandwidth, first_token, steps, prefill, gguf_tensors(path), config)


def gguf_tensors(path: Path) -> dict:
    """{name: object with .nbytes} of a GGUF file's tensors, the embedding under the official
    name, so that bench's 'bytes read per token: all but the embedding' means the same."""
    import gguf

    names = {"token_embd.weight": "transformer.embedding.word_embeddings.weight"}
    return {
        names.get(t.name, t.name): _Bytes(int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors
    }


class _Bytes:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def ratios(results: dict, prompts) -> list[str]:
    """Markdown rows: glm_numpy / llama.cpp at the same width, from this run's results."""
    rows = [
        "| glm_numpy / llama.cpp | decode | prefill 16 / 128 / 512 | peak RSS |",
        "|---|---|---|---|",
    ]
    for name, ours in results.items():
        if not name.startswith("glm_numpy ") or "error" in ours:
            continue
        fmt = name.removeprefix("glm_numpy ")
        theirs = results.get(f"llama.cpp {SAME_WIDTH.get(fmt)}")
        if not theirs or "error" in theirs:
            continue
        prefill = " / ".join(
            f"{ours['prefill_tok_s'][str(n)] / theirs['prefill_tok_s'][str(n)]:.2f}"
            for n in prompts
        )
        rows.append(
            f"| {fmt} / {SAME_WIDTH[fmt]} | {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f} "
            f"| {prefill} | {ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f} |"
        )
    return rows
