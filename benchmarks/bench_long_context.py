"""Long-context benchmark (issue 16): glm_numpy beside llama.cpp at contexts of 16 to 32K tokens.

    python benchmarks/bench_long_context.py --checkpoints DIR [--gguf-dir DIR] [--lock FILE]
        [--formats int4 fp16] [--long-prompt] [--out results.json] [--write-docs]

Under --checkpoints: 6b-int4 and 6b-safetensors (fp16), as for benchmarks/bench.py. Under
--gguf-dir (optional): 6b-q4_0.gguf and 6b-f16.gguf of the same weights (llama-cpp-python).

Measures, each in its own subprocess (so that peak RSS is the measurement's own; with --lock,
each subprocess runs under ``flock FILE``, one full-size model in memory at a time):
- decode tokens/s after a context of 16 / 2K / 8K / 32K tokens, each beside decode after 16
  tokens in the same process, in alternating rounds (median step): their ratio is what the
  issue's target asks, and on a shared VM only a ratio taken under the same conditions holds.
  glm_numpy's cache is filled with random keys and values (decode time does not depend on
  them; a real 32K prefill takes most of an hour); llama.cpp's is filled by a real prefill, so
  it stops at 8K;
- prefill tokens/s of 512 / 2K / 8K-token prompts (glm_numpy chunked, prefill_chunk=512;
  llama.cpp with n_batch=512, flash attention on), 2 threads everywhere;
- with the 8K int4 prompt, what a float16 / bfloat16 KV cache does to the next token's logits
  (the cache's contents rounded, docs/numerics.md);
- --long-prompt: a 32,768-token prompt on int4, its peak RSS against weights + KV cache.

Prints a markdown table; --write-docs puts it into docs/performance.md between the
``long-context`` markers. Not a test: it needs the 6B checkpoints and most of an hour.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"int4": ("6b-int4", "6b-q4_0.gguf"), "fp16": ("6b-safetensors", "6b-f16.gguf")}
CONTEXTS = (16, 2048, 8192, 32768)
PROMPTS = (512, 2048, 8192)
LLAMA_CONTEXTS = (16, 2048, 8192)  # decode after a real prefill: 32K would take an hour
DECODE_STEPS = 6  # per round
ROUNDS = 3  # alternating rounds of decode after the long and the short context
SHORT = 16  # the short context each decode figure is compared with
THREADS = 2
SEED = 0
BEGIN, END = "<!-- long-context:begin -->", "<!-- long-context:end -->"


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_ids(n: int, vocab: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(100, vocab, n)


# ------------------------------------------------------------------ glm_numpy, in a subprocess
def glm_decode(directory: str, context: int) -> dict:
    """Decode tokens/s after `context` cached tokens (random keys and values), and after SHORT
    tokens in the same process, in alternating rounds (interleaved_decode)."""
    import numpy as np

    from glm_numpy import ChatGLM2

    model = ChatGLM2.from_pretrained(directory)
    c = model.config
    steps = ROUNDS * DECODE_STEPS + 2
    context = min(context, c.seq_length - steps)  # 32K: just inside seq_length

    def filled_cache(tokens: int):
        cache = model.new_cache()
        cache.make_room(tokens + steps)
        slots = cache.extend(np.ones(tokens, dtype=bool))
        kv = np.random.default_rng(SEED).standard_normal((tokens, c.num_kv_groups, c.head_dim))
        for layer in range(c.num_layers):
            cache.store(layer, slots, kv.astype(np.float32), kv.astype(np.float32))
        return cache

    long, short = filled_cache(context), filled_cache(SHORT)
    token = np.array([100])
    return {
        **interleaved_decode(
            lambda: model.forward(token, long, last_only=True),
            lambda: model.forward(token, short, last_only=True),
        ),
        "peak_rss": peak_rss(),
        "context": context,
    }


def interleaved_decode(step_long, step_short) -> dict:
    """Median seconds per decode step after the long context and after the short one, measured
    in ROUNDS alternating rounds of DECODE_STEPS steps each (after one warm-up step of each):
    the VM is shared, and a step's time drifts with what else runs, so the ratio of the two is
    taken under the same conditions, and the median ignores a step that another job delayed."""
    step_long(), step_short()  # compile, fault the weights in
    times: dict[str, list[float]] = {"long": [], "short": []}
    for _ in range(ROUNDS):
        for name, step in (("long", step_long), ("short", step_short)):
            for _ in range(DECODE_STEPS):
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
    long, short = (sorted(times[name])[len(times[name]) // 2] for name in ("long", "short"))
    return {
        "tokens_per_second": 1 / long,
        "tokens_per_second_short": 1 / short,
        "ratio_to_short": short / long,
    }


def glm_prefill(directory: str, tokens: int, numerics: bool) -> dict:
    """Prefill tokens/s of a `tokens`-token prompt (chunked), after a warm-up prompt."""
    import numpy as np

    from glm_numpy import ChatGLM2

    model = ChatGLM2.from_pretrained(directory)
    ids = random_ids(tokens, model.config.padded_vocab_size)
    model.forward(ids[:600], model.new_cache(), last_only=True)  # compile, fault weights in
    cache = model.new_cache()
    started = time.perf_counter()
    model.forward(ids, cache, last_only=True)
    seconds = time.perf_counter() - started
    result = {"tokens_per_second": tokens / seconds, "peak_rss": peak_rss()}
    if numerics:
        result["cache_dtype_effect"] = cache_dtype_effect(model, cache, np)
    return result


def cache_dtype_effect(model, cache, np) -> dict:
    """The next token's logits with the cache's keys and values rounded to 16 bits."""
    token = np.array([100])
    S = cache.length
    rounded = {}
    for dtype in ("float16", "bfloat16"):
        copy = model.new_cache(dtype)
        copy.make_room(S + 1)
        slots = copy.extend(cache.is_token.copy())
        for layer in range(model.config.num_layers):
            copy.store(layer, slots, cache.keys(layer), cache.values(layer))
        rounded[dtype] = model.forward(token, copy, last_only=True)[-1]
    reference = model.forward(token, cache, last_only=True)[-1]
    top = set(np.argsort(-reference)[:10])
    return {
        dtype: {
            "max_abs_logit_difference": float(np.abs(logits - reference).max()),
            "relative": float(np.abs(logits - reference).max() / np.abs(reference).max()),
            "same_argmax": bool(np.argmax(logits) == np.argmax(reference)),
            "top10_overlap": len(top & set(np.argsort(-logits)[:10])),
        }
        for dtype, logits in rounded.items()
    }


def glm_long_prompt(directory: str, tokens: int) -> dict:
    """A `tokens`-token prompt, fed 4096 at a time (each chunked by the model) so that progress
    shows; peak RSS against the weights and the KV cache."""
    import numpy as np

    from glm_numpy import ChatGLM2

    model = ChatGLM2.from_pretrained(directory)
    weights = sum(np.asarray(a).nbytes for a in model.weights.values())
    tokens = min(tokens, model.config.seq_length)
    ids = random_ids(tokens, model.config.padded_vocab_size)
    cache = model.new_cache()
    cache.make_room(tokens)
    started = time.perf_counter()
    for start in range(0, tokens, 4096):
        model.forward(ids[start : start + 4096], cache, last_only=True)
        print(
            f"{cache.length} tokens, {time.perf_counter() - started:.0f} s, "
            f"peak RSS {peak_rss() / 2**30:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "peak_rss": peak_rss(),
        "weights": weights,
        "kv_cache": cache.nbytes,
    }


# ------------------------------------------------------------------ llama.cpp, in a subprocess
def llama_run(path: str, context: int) -> dict:
    """Prefill `context` tokens (n_batch 512 chunks), then decode beside a SHORT-token context of
    the same model in the same process (interleaved_decode)."""
    from llama_cpp import Llama

    def load(tokens: int) -> Llama:
        return Llama(
            model_path=path,  # memory-mapped: two contexts share one copy of the weights
            n_ctx=tokens + ROUNDS * DECODE_STEPS + 8,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            n_batch=512,
            n_ubatch=512,
            flash_attn=True,
            verbose=False,
        )

    llm = load(context)
    ids = [int(i) for i in random_ids(context, llm.n_vocab())]
    started = time.perf_counter()
    llm.eval(ids)  # fed n_batch tokens at a time
    prefill = time.perf_counter() - started
    rss = peak_rss()  # before the second context maps the weights again (RSS would count twice)
    short = load(SHORT)
    short.eval(ids[:SHORT])
    return {
        "prefill_tokens_per_second": context / prefill,
        **interleaved_decode(lambda: llm.eval([100]), lambda: short.eval([100])),
        "peak_rss": rss,
    }


# ------------------------------------------------------------------ the attention kernel alone
def kernel_gflops(tokens: int = 8192, chunk: int = 512) -> dict:
    """GFLOP/s of glm_numpy's attention over one 6B layer's causal prefill of `tokens` (H=32,
    G=2, Dh=128), in prefill chunks as the model runs it and in one pass, beside numpy's sgemm
    ([4096, 4096]^2), alternated three times, best of each. FLOPs: 4 Dh per (head, query, key)
    a query may see, T(T+1)/2 pairs per head."""
    import numpy as np

    from glm_numpy.kernels.attention import attention_context
    from glm_numpy.layers.attention import causal_mask

    H, G, Dh = 32, 2, 128
    rng = np.random.default_rng(SEED)
    q = rng.standard_normal((tokens, H, Dh)).astype(np.float32)
    keys, values = rng.standard_normal((2, G, tokens, Dh)).astype(np.float32)  # cache layout
    keys, values = keys.transpose(1, 0, 2), values.transpose(1, 0, 2)  # [S, G, Dh] views
    flops = 4 * Dh * H * tokens * (tokens + 1) / 2
    a = rng.standard_normal((4096, 4096)).astype(np.float32)

    def chunked() -> None:
        for t0 in range(0, tokens, chunk):
            t1 = min(tokens, t0 + chunk)
            attention_context(q[t0:t1], keys[:t1], values[:t1], causal_mask(t1 - t0, t1))

    def one_pass() -> None:
        attention_context(q, keys, values, causal_mask(tokens, tokens))

    def sgemm() -> None:
        np.matmul(a, a)

    best = {"chunked": 0.0, "one_pass": 0.0, "sgemm": 0.0}
    work = {"chunked": flops, "one_pass": flops, "sgemm": 2 * 4096**3}
    for _ in range(3):
        for name, run in (("chunked", chunked), ("one_pass", one_pass), ("sgemm", sgemm)):
            started = time.perf_counter()
            run()
            best[name] = max(best[name], work[name] / (time.perf_counter() - started) / 1e9)
    return {f"{name}_gflops": value for name, value in best.items()}


WORKERS = {
    "kernel": kernel_gflops,
    "glm_decode": glm_decode,
    "glm_prefill": glm_prefill,
    "glm_long_prompt": glm_long_prompt,
    "llama": llama_run,
}


# ------------------------------------------------------------------ driver
def measure(lock: str | None, worker: str, *args) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps([worker, *args])]
    if lock:
        command = ["flock", lock, *command]
    print(f"  {worker} {args}", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"    {result}", file=sys.stderr, flush=True)
    return result


def run(args) -> dict:
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name in args.formats:
        checkpoint, gguf = FORMATS[name]
        directory = str(Path(args.checkpoints) / checkpoint)
        glm = results.setdefault(f"glm_numpy {name}", {})
        for context in args.contexts if "glm" in args.runtimes else ():
            glm[f"decode@{context}"] = measure(args.lock, "glm_decode", directory, context)
        for tokens in args.prompts if "glm" in args.runtimes else ():
            numerics = name == "int4" and tokens == max(args.prompts)
            glm[f"prefill {tokens}"] = measure(
                args.lock, "glm_prefill", directory, tokens, numerics
            )
        if "llama" in args.runtimes and args.gguf_dir and (Path(args.gguf_dir) / gguf).is_file():
            llama = results.setdefault(f"llama.cpp {gguf.split('-')[1][:-5]}", {})
            for context in LLAMA_CONTEXTS:
                if context <= max(args.contexts):
                    path = str(Path(args.gguf_dir) / gguf)
                    llama[f"run@{context}"] = measure(args.lock, "llama", path, context)
    if args.kernel:  # no checkpoint: no lock
        results["attention kernel"] = measure(None, "kernel")
    if args.long_prompt:
        directory = str(Path(args.checkpoints) / FORMATS["int4"][0])
        results["long prompt int4"] = measure(args.lock, "glm_long_prompt", directory, 32768)
    return results


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def table(results: dict) -> str:
    """The markdown section for docs/performance.md."""
    lines = [
        f"Runs {', '.join(results.get('runs', [results['started']]))} "
        "(`python benchmarks/bench_long_context.py`), full-size random",
        f"6B, {THREADS} threads, one subprocess per cell. Decode tok/s (peak RSS GiB) after",
        "a context of N tokens; prefill tok/s of an N-token prompt.",
        "",
        "| | " + " | ".join(f"decode @{c}" for c in CONTEXTS) + " | "
        + " | ".join(f"prefill {p}" for p in PROMPTS) + " |",
        "|---" * (1 + len(CONTEXTS) + len(PROMPTS)) + "|",
    ]  # fmt: skip
    for runtime, cells in results.items():
        if not isinstance(cells, dict) or runtime.startswith(("long", "attention")):
            continue
        row = [runtime]
        for c in CONTEXTS:
            cell = cells.get(f"decode@{c}") or cells.get(f"run@{c}") or {}
            row.append(_cell(cell, "tokens_per_second"))
        for p in PROMPTS:
            cell = cells.get(f"prefill {p}") or cells.get(f"run@{p}") or {}
            key = (
                "prefill_tokens_per_second" if runtime.startswith("llama") else "tokens_per_second"
            )
            row.append(_cell(cell, key))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Decode after N tokens / decode after 16, the two measured in alternating rounds in one",
        "process (median step):",
        "",
        "| | " + " | ".join(f"@{c}" for c in CONTEXTS[1:]) + " |",
        "|---" * len(CONTEXTS) + "|",
    ]
    for runtime, cells in results.items():
        if not isinstance(cells, dict) or runtime.startswith(("long", "attention")):
            continue
        row = [runtime]
        for c in CONTEXTS[1:]:
            cell = cells.get(f"decode@{c}") or cells.get(f"run@{c}") or {}
            row.append(f"{cell['ratio_to_short']:.0%}" if "ratio_to_short" in cell else "—")
        lines.append("| " + " | ".join(row) + " |")
    kernel = results.get("attention kernel")
    if kernel and "sgemm_gflops" in kernel:
        lines += [
            "",
            f"Attention kernel alone, one 6B layer's 8K causal prefill: "
            f"{kernel['chunked_gflops']:.0f} GFLOP/s in 512-token chunks, "
            f"{kernel['one_pass_gflops']:.0f} in one pass; numpy sgemm "
            f"{kernel['sgemm_gflops']:.0f} GFLOP/s in the same process "
            f"({kernel['chunked_gflops'] / kernel['sgemm_gflops']:.0%} and "
            f"{kernel['one_pass_gflops'] / kernel['sgemm_gflops']:.0%}).",
        ]
    long = results.get("long prompt int4")
    if long and "peak_rss" in long:
        budget = long["weights"] + long["kv_cache"] + 2**30 * 1.5
        lines += [
            "",
            f"32,768-token prompt on int4: {long['tokens_per_second']:.1f} tok/s "
            f"({long['seconds'] / 60:.0f} min), peak RSS {gib(long['peak_rss'])} GiB against "
            f"weights {gib(long['weights'])} + KV cache {gib(long['kv_cache'])} + 1.5 = "
            f"{gib(budget)} GiB.",
        ]
    return "\n".join(lines)


def _cell(cell: dict, key: str) -> str:
    if key not in cell:
        return "—" if "error" not in cell else "error"
    return f"{cell[key]:.2f} ({gib(cell['peak_rss'])})"


def write_docs(section: str) -> None:
    path = REPO / "docs" / "performance.md"
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n## Long context\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", help="directory holding 6b-int4 and 6b-safetensors")
    parser.add_argument("--gguf-dir", help="directory holding 6b-q4_0.gguf and 6b-f16.gguf")
    parser.add_argument("--lock", help="run each measurement under flock LOCK")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=["int4", "fp16"])
    parser.add_argument("--contexts", nargs="*", type=int, default=list(CONTEXTS))
    parser.add_argument("--prompts", nargs="*", type=int, default=list(PROMPTS))
    parser.add_argument("--long-prompt", action="store_true", help="also a 32K prompt on int4")
    parser.add_argument("--kernel", action="store_true", help="also the attention kernel alone")
    parser.add_argument("--runtimes", nargs="+", choices=["glm", "llama"], default=["glm", "llama"])
    parser.add_argument("--out", help="write (and merge into) this JSON file")
    parser.add_argument("--table-from", help="only print the table of this JSON file")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, *worker_args = json.loads(args.worker)
        print(json.dumps(WORKERS[name](*worker_args)))
        return
    if args.table_from:
        results = json.loads(Path(args.table_from).read_text())
    else:
        if not args.checkpoints:
            parser.error("--checkpoints DIR is required")
        results = run(args)
        if args.out and Path(args.out).is_file():  # merge with earlier partial runs, cell by cell
            earlier = json.loads(Path(args.out).read_text())
            for runtime, cells in results.items():
                if isinstance(cells, dict):
                    earlier[runtime] = {**earlier.get(runtime, {}), **cells}
            earlier.setdefault("runs", [earlier["started"]]).append(results["started"])
            results = earlier
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    section = table(results)
    print(section)
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    main()
