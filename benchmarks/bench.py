"""Benchmark glm_numpy on the full-size random ChatGLM2-6B, format by format, beside torch.

    python -m pip install -e ".[bench]"
    python benchmarks/bench.py --checkpoints CKPT

expects under --checkpoints (see docs/performance.md for the commands that make them):
    6b-safetensors  fp16 (glm-numpy make-random-checkpoint + convert)
    6b-bf16         glm-numpy convert 6b-safetensors 6b-bf16 --dtype bfloat16
    6b-int8         glm-numpy quantize 6b-safetensors 6b-int8 --bits 8
    6b-int4         glm-numpy quantize 6b-safetensors 6b-int4 --bits 4
    6b-int4-g128    glm-numpy quantize 6b-safetensors 6b-int4-g128 --bits 4 --group-size 128

and measures in ONE run: the memory read bandwidth; numpy's fp32 sgemm GFLOP/s; for each format
(each in its own subprocess, one after the other, so only one model is ever in memory) the time
from opening the checkpoint to the first token, prefill tokens/s for 16/128/512-token prompts,
decode tokens/s, peak RSS; llama.cpp on the same weights exported to f16 / q8_0 / q4_0 GGUF
(exported once, kept as CKPT/6b-<type>.gguf; benchmarks/llamacpp.py); and transformers'
GlmForCausalLM in bf16 on the same weights (2 threads, SDPA). Writes docs/performance.json,
docs/performance.md (tables) and docs/performance.png. Not a test: it needs the 12.5 GB
checkpoints and ~20 minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# glm_numpy before numpy: importing it sets OpenBLAS's thread timeout (glm_numpy/__init__.py)
# before numpy loads OpenBLAS, so this process's sgemm and linear figures run as the library's.
import glm_numpy  # noqa: F401

# isort: split
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FORMATS = {
    "fp16": "6b-safetensors",
    "bf16": "6b-bf16",
    "int8": "6b-int8",
    "int4": "6b-int4",
    "int4-g128": "6b-int4-g128",
}
TORCH_FORMAT = "bf16"
LLAMA_CPP_TYPES = ("f16", "q8_0", "q4_0")
PROMPTS = (16, 128, 512)
CHAT_PROMPT = 128  # tokens of the chat prompt whose time to the first token is measured
# OpenBLAS settings this machine kind sets by default (its AVX2 kernels); each glm_numpy run whose
# prefill calls sgemm (16-bit weights, compute float32) is also run with them unset.
OPENBLAS_DEFAULTS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
DECODE_STEPS = 12
DECODE_PROBE_GIB = 1.0  # bandwidth probe around the decode steps
SEED = 0
# The tokenizer written into the GGUF files (the random checkpoints have none): the real one
# beside the repository when present, else the default model's (speed does not depend on it).
REAL_TOKENIZER = REPO.parent / "shared" / "data" / "chatglm2-tokenizer" / "tokenizer.model"


# ------------------------------------------------------------------ measurements in this process
def cpu_description() -> str:
    """e.g. "AMD EPYC, AVX-512 (with BF16), 2 cores": results move with the VM's CPU kind."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    if "avx512f" in flags:
        vector = "AVX-512" + (" (with BF16)" if "avx512_bf16" in flags else "")
    else:
        vector = "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {vector}, {os.cpu_count()} cores"


@functools.cache
def probe_buffer(gib: float) -> np.ndarray:
    """The bandwidth probe's array, allocated once per process. A worker allocates it before it
    opens its checkpoint: allocated between a prefill and the decode steps, its GiB pushed
    mapped weight pages out of the page cache, and the first decode step read them back from
    disk (1.8-6.5 s, glm_numpy and torch alike; llama.cpp copies its weights and was spared)."""
    return np.ones(int(gib * 2**30) // 4, dtype=np.float32)


def memory_bandwidth(gib: float = 2.0, repeats: int = 7) -> float:
    """Read bandwidth in bytes/s: a numba prange sum over ``gib`` GiB of float32 (median)."""
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def total(a):
        s = 0.0
        for i in prange(a.size):
            s += a[i]
        return s

    a = probe_buffer(gib)
    total(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(a)
        times.append(time.perf_counter() - start)
    return a.nbytes / float(np.median(times))


def openblas_core() -> str:
    """The CPU kind OpenBLAS picked its sgemm kernels for (needs threadpoolctl, optional)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = threadpool_info()
    cores = [i.get("architecture", "?") for i in pools if i["internal_api"] == "openblas"]
    return ", ".join(cores) or "OpenBLAS not loaded"


def sgemm_gflops(tokens: int, rows: int = 13696, columns: int = 4096, repeats: int = 5) -> float:
    """numpy float32 X [T, I] @ W.T [I, O] (the MLP's up projection), GFLOP/s (median)."""
    rng = np.random.default_rng(SEED)
    w = rng.standard_normal((rows, columns), dtype=np.float32)
    x = rng.standard_normal((tokens, columns), dtype=np.float32)
    x @ w.T
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - start)
    return 2 * tokens * rows * columns / float(np.median(times)) / 1e9


def kernel_prefill_gflops(tokens: int, rows: int = 13696, columns: int = 4096) -> float:
    """glm_numpy's linear over fp16 weights (register tiles) on the same shape."""
    from glm_numpy.layers.linear import linear

    rng = np.random.default_rng(SEED)
    w = rng.standard_normal((rows, columns), dtype=np.float32).astype(np.float16)
    x = rng.standard_normal((tokens, columns), dtype=np.float32)
    linear(x, w)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        linear(x, w)
        times.append(time.perf_counter() - start)
    return 2 * tokens * rows * columns / float(np.median(times)) / 1e9


# ------------------------------------------------------------------ one format, in a subprocess
def prompt_ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(100, vocab, max(PROMPTS) + DECODE_STEPS + 1)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def weight_bytes(checkpoint, embedding_name: str) -> tuple[int, int]:
    """(all stored bytes, bytes read per decoded token: all but the embedding, only gathered)."""
    total = sum(a.nbytes for a in checkpoint.values())
    return total, total - checkpoint[embedding_name].nbytes


def linear_flops_per_token(config) -> int:
    """2 x the parameters of the layers' Linear weights (the output layer runs on 1 row)."""
    D, F = config.hidden_size, config.ffn_hidden_size
    per_layer = config.qkv_size * D + D * D + 2 * F * D + F * D
    return 2 * config.num_layers * per_layer


def run_glm_numpy(directory: Path, compute: str = "float32") -> dict:
    from glm_numpy.model import ChatGLM2

    start = time.perf_counter()
    model = ChatGLM2.from_pretrained(directory, compute=compute)
    ids = prompt_ids(model.config.padded_vocab_size)
    cache = model.new_cache()
    model.forward(ids[:16], cache=cache, last_only=True)
    first_token = time.perf_counter() - start
    steps, bandwidth = timed_decode(
        lambda t: model.forward(ids[t : t + 1], cache=cache, last_only=True)
    )
    prefill = {}
    for n in PROMPTS:
        step = time.perf_counter()
        model.forward(ids[:n], cache=model.new_cache(), last_only=True)
        prefill[n] = n / (time.perf_counter() - step)
    result = measurements(bandwidth, first_token, steps, prefill, model.weights, model.config)
    result["chat_first_token_s"] = chat_first_token(model)
    return result


def chat_first_token(model) -> float:
    """Seconds from a CHAT_PROMPT-token prompt (a new chat: fresh cache) to its first token
    chosen (greedy), the model loaded: what a user waits before the reply starts."""
    ids = prompt_ids(model.config.padded_vocab_size)[-CHAT_PROMPT:]  # not a prefix seen before
    start = time.perf_counter()
    logits = model.forward(ids, cache=model.new_cache(), last_only=True)
    int(np.argmax(logits[-1]))
    return time.perf_counter() - start


def run_torch(directory: Path) -> dict:
    """transformers GlmForCausalLM (spec §10) in bf16 on the same weights, zero-copy."""
    import torch
    from transformers import GlmForCausalLM
    from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

    sys.path.insert(0, str(REPO))
    from glm_numpy.checkpoint import load_checkpoint
    from glm_numpy.config import ChatGLM2Config
    from tests.oracle import glm_config

    torch.set_num_threads(2)
    start = time.perf_counter()
    config = ChatGLM2Config.from_json(directory / "config.json")
    checkpoint = load_checkpoint(directory)
    glm = glm_config(config)
    glm._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = GlmForCausalLM(glm)
    model.load_state_dict(bf16_state_dict(config, checkpoint), assign=True, strict=True)
    model.model.rotary_emb = GlmRotaryEmbedding(config=glm)  # meta buffers hold garbage
    model.eval()
    ids = torch.from_numpy(prompt_ids(config.padded_vocab_size))[None]
    with torch.inference_mode():
        out = model(ids[:, :16], use_cache=True)
        first_token = time.perf_counter() - start
        past = out.past_key_values

        def decode(t: int) -> None:
            nonlocal past
            past = model(ids[:, t : t + 1], past_key_values=past, use_cache=True).past_key_values

        steps, bandwidth = timed_decode(decode)
        prefill = {}
        for n in PROMPTS:
            step = time.perf_counter()
            model(ids[:, :n], use_cache=True, logits_to_keep=1)
            prefill[n] = n / (time.perf_counter() - step)
        step = time.perf_counter()
        int(model(ids[:, -CHAT_PROMPT:], use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
        chat_first = time.perf_counter() - step
    result = measurements(bandwidth, first_token, steps, prefill, checkpoint, config)
    result["chat_first_token_s"] = chat_first
    return result


def run_llamacpp(path: Path) -> dict:
    from llamacpp import run_llamacpp as measure_llamacpp  # benchmarks/, the script's directory

    return measure_llamacpp(path, PROMPTS, prompt_ids, timed_decode, measurements)


def timed_decode(decode_one) -> tuple[list[float], float]:
    """Seconds per call of decode_one(t) for the DECODE_STEPS positions after the 16-token
    prompt, and the read bandwidth around them: the machine is shared and its bandwidth drifts
    by tens of percent within minutes, so it is measured just before and just after the steps
    (1 GiB, median of 5 each) and the roofline uses the mean."""
    before = memory_bandwidth(gib=DECODE_PROBE_GIB, repeats=5)
    steps = []
    for t in range(16, 16 + DECODE_STEPS):
        step = time.perf_counter()
        decode_one(t)
        steps.append(time.perf_counter() - step)
    after = memory_bandwidth(gib=DECODE_PROBE_GIB, repeats=5)
    return steps, (before + after) / 2


def measurements(bandwidth, first_token, steps, prefill, weights, config) -> dict:
    """One runtime's figures (the same fields for glm_numpy and torch)."""
    total, per_token = weight_bytes(weights, "transformer.embedding.word_embeddings.weight")
    flops = linear_flops_per_token(config)
    return {
        "bandwidth_bytes_s": bandwidth,
        "open_to_first_token_s": first_token,
        "decode_tok_s": 1 / float(np.median(steps)),
        "decode_step_ms": [1e3 * s for s in steps],
        "prefill_tok_s": prefill,
        "prefill_linear_gflops": {n: prefill[n] * flops / 1e9 for n in PROMPTS},
        "peak_rss_bytes": peak_rss(),
        "weight_bytes": total,
        "bytes_per_token": per_token,
    }


def bf16_state_dict(config, checkpoint) -> dict:
    """Official names -> Glm names (spec §10), bf16 tensors sharing the mapped pages."""
    import torch

    from glm_numpy.testing import glm_state_dict

    def tensor(name):
        bits = np.asarray(checkpoint[name])
        if bits.dtype != np.uint16:
            raise SystemExit(f"torch baseline needs a bfloat16 checkpoint; {name} is {bits.dtype}")
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)

    return glm_state_dict(config, tensor)


def run_in_subprocess(
    runner: str, directory: Path, unset_openblas: bool = False, lock: Path | None = None
) -> dict:
    """One format in a fresh process (its memory is returned to the system when it exits),
    optionally without the machine's OpenBLAS settings (OPENBLAS_DEFAULTS), and with a lock
    file under ``flock`` (so that other jobs on a shared machine can wait for it)."""
    command = [sys.executable, __file__, "--worker", runner, str(directory)]
    if lock is not None:
        command = ["flock", str(lock), *command]
    env = {k: v for k, v in os.environ.items() if not (unset_openblas and k in OPENBLAS_DEFAULTS)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


GLM_NUMPY_RUNNERS = {"glm_numpy": "float32", "glm_numpy-bf16": "bf16"}  # runner -> compute


def glm_numpy_runs(formats: list[str], openblas_unset: bool) -> list[tuple[str, str, str, bool]]:
    """(name, runner, checkpoint folder, unset OpenBLAS settings) for each glm_numpy run: every
    format as a user runs it; bf16 again with compute="bf16"; with openblas_unset, 16-bit formats
    again with the machine's OpenBLAS settings unset (glm_numpy's own kernels do not call
    sgemm for them any more: a check that the settings no longer matter)."""
    runs = []
    for f in formats:
        runs.append((f"glm_numpy {f}", "glm_numpy", FORMATS[f], False))
        if openblas_unset and f in ("fp16", "bf16"):
            runs.append((f"glm_numpy {f}, OpenBLAS settings unset", "glm_numpy", FORMATS[f], True))
        if f == "bf16":
            runs.append(("glm_numpy bf16, compute bf16", "glm_numpy-bf16", FORMATS[f], False))
    return runs


# ------------------------------------------------------------------ report
def roofline(bandwidth: float, result: dict) -> float:
    """tokens/s if every weight byte were read once per token at the bandwidth measured around
    this runtime's decode steps (falling back to the one measured at the start)."""
    return result.get("bandwidth_bytes_s", bandwidth) / result["bytes_per_token"]


# Sections of docs/performance.md that other benchmarks write (bench_serve.py and
# bench_long_context.py):
# they are kept as they are when this one rewrites the rest of the page.
OTHER_SECTIONS = ("## Serving", "## Long context")


def sections_of_other_benchmarks(page: str) -> str:
    """The OTHER_SECTIONS of an earlier performance.md, each to the next '## ' heading."""
    kept = []
    for part in page.split("\n## ")[1:]:
        if any(f"## {part}".startswith(heading) for heading in OTHER_SECTIONS):
            kept.append(f"\n## {part.rstrip()}\n")
    return "".join(kept)


def markdown(report: dict) -> str:
    from glm_numpy.kernels.intdot import HAS_AVX512_VNNI, PREFETCH_AHEAD

    bw = report["memory_bandwidth_bytes_s"]
    sgemm = report["numpy_sgemm_gflops"]
    torch_result = report["results"].get("torch bf16", {})
    lines = [
        "# Performance",
        "",
        f"Measured in one run on {report['machine']} ({report['date']}), 2 threads, "
        "full-size random ChatGLM2-6B. The VM is shared: expect ±10-20 % between runs; compare "
        "within this table.",
        "",
        f"- memory read bandwidth (numba prange sum, 2 GiB, median of 7): **{bw / 1e9:.1f} GB/s**",
        "- numpy fp32 sgemm, X [T, 4096] @ W.T [4096, 13696]: "
        + ", ".join(f"{sgemm[str(n)]:.0f} GFLOP/s at T={n}" for n in PROMPTS),
        "- glm_numpy linear on fp16 weights, same shape (register tiles, float32-exact): "
        + ", ".join(f"{report['kernel_prefill_gflops'][str(n)]:.0f}" for n in PROMPTS)
        + " GFLOP/s",
        f"- environment: {report['environment']}",
        "",
        "| runtime / format | weights GB | GB/s now | decode tok/s | roofline tok/s "
        "| % of roofline | vs torch bf16 | prefill tok/s 16 / 128 / 512 "
        "| prefill linear GFLOP/s 128 / 512 | open → 1st token s | peak RSS GB "
        f"| {CHAT_PROMPT}-token chat → 1st token s | 1st decode step / median |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        roof = roofline(bw, r)
        speedup = r["decode_tok_s"] / torch_result["decode_tok_s"] if torch_result else float("nan")
        p, g = r["prefill_tok_s"], r["prefill_linear_gflops"]
        lines.append(
            f"| {name} | {r['weight_bytes'] / 1e9:.2f} | {r['bandwidth_bytes_s'] / 1e9:.1f} "
            f"| {r['decode_tok_s']:.2f} | {roof:.2f} "
            f"| {100 * r['decode_tok_s'] / roof:.0f} % | {speedup:.2f}x "
            f"| {p['16']:.1f} / {p['128']:.1f} / {p['512']:.1f} | {g['128']:.0f} / {g['512']:.0f} "
            f"| {r['open_to_first_token_s']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} "
            f"| {r.get('chat_first_token_s', float('nan')):.2f} "
            f"| {r['decode_step_ms'][0] / np.median(r['decode_step_ms']):.2f} |"
        )
    lines += [
        "",
        "Decode: median of "
        f"{DECODE_STEPS} steps after a 16-token prompt; roofline = bandwidth (measured by each "
        "runtime's process just before and just after its decode steps, 1 GiB, median of 5 "
        "each, the mean of the two: other jobs share this VM) / bytes read per token (all "
        "weights but the embedding). Prefill: one pass over a prompt of 16/128/512 tokens with "
        "a fresh cache (logits of the last token only); linear "
        "GFLOP/s counts the layers' matrix products only, the time includes everything. "
        "Open → first token: from ChatGLM2.from_pretrained to the logits of a 16-token prompt "
        "(page cache as the previous runs left it). Peak RSS includes the 1 GiB bandwidth probe, "
        "allocated while the model is loaded.",
        "",
        "## What runs",
        "",
        "- decode, 16-bit weights: numba matvec over the uint16 bits, widened in registers "
        "(fp16 via `vcvtph2ps`, bf16 by a 16-bit shift), output rows split over 2 threads, "
        "two rows at a time where x is too long for L1 (the MLP's down projection);",
        "- decode, int8/int4: the activation row is rounded to int8 (one scale per 32 weight "
        "bytes) and multiplied as integers (glm_numpy/kernels/intdot.py): "
        + (
            "AVX-512 VNNI `vpdpbusd`, two blocks of 32 bytes per step in 16 lanes"
            if HAS_AVX512_VNNI
            else "AVX2 `vpmaddubsw`/`vpmaddwd`, one block of 32 bytes per step in 8 lanes"
        )
        + ", the weight scales applied per group, the weights prefetched "
        f"{PREFETCH_AHEAD // 1024} KiB ahead in software;",
        "- prefill (and batched decode): 16-bit weights as outer products over packed "
        "panels, 24 FMA accumulators of 16 tokens, the weight broadcast from memory "
        "(glm_numpy/kernels/tiles.py; with compute bf16, `vdpbf16ps` on bf16-rounded "
        "activations); int8/int4 in tiles of 2 (int4) or 4 (int8) weight rows x 4 "
        "tokens with the activations rounded to int8 as in decode and `vpdpbusd` "
        "(glm_numpy/kernels/multirow.py); no sgemm; attention over the cache and RMSNorm as "
        "fused numba kernels (up to 16 new tokens, the 16 heads of a kv group in the 16 lanes of "
        "a register; longer prompts, tiles of BLAS products with an online softmax);",
        "- int8/int4 keep the embedding and the output layer in fp16 (the official scheme).",
        "",
        "## glm_numpy / llama.cpp at the same width, this run",
        "",
        *llamacpp_ratios(report["results"], PROMPTS),
        "",
        "llama.cpp (llama-cpp-python built for AVX-512 with VNNI, without AMX, which crashes these "
        "VMs; 2 threads, its f16 KV cache) "
        "runs the same random weights exported by `glm-numpy export-gguf` from the fp16 "
        "checkpoint; q4_0 keeps its output layer q8_0. Above 1 glm_numpy is faster (peak RSS: "
        "uses more).",
        "",
        "![decode and prefill by format](performance.png)",
        "",
        "Reproduce (about 35 GB of checkpoints, 30 minutes; never two models in memory at once):",
        "",
        '    python -m pip install -e ".[bench]"',
        "    CKPT=path/to/checkpoints",
        "    glm-numpy make-random-checkpoint $CKPT/6b-bin            # fp16 .bin shards",
        "    glm-numpy convert $CKPT/6b-bin $CKPT/6b-safetensors",
        "    glm-numpy convert $CKPT/6b-safetensors $CKPT/6b-bf16 --dtype bfloat16",
        "    glm-numpy quantize $CKPT/6b-safetensors $CKPT/6b-int8 --bits 8",
        "    glm-numpy quantize $CKPT/6b-safetensors $CKPT/6b-int4 --bits 4",
        "    glm-numpy quantize $CKPT/6b-safetensors $CKPT/6b-int4-g128 --bits 4 --group-size 128",
        "    python benchmarks/bench.py --checkpoints $CKPT      # exports $CKPT/6b-*.gguf once",
        "",
        "The VMs here set OPENBLAS_CORETYPE=Haswell and OPENBLAS_L2_SIZE, which hold OpenBLAS to "
        "its AVX2 kernels (the tests and CI keep them); to measure the sgemm OpenBLAS picks for "
        "the CPU, unset both for the benchmark alone: `env -u OPENBLAS_CORETYPE -u "
        "OPENBLAS_L2_SIZE python benchmarks/bench.py`. The environment line above says which way "
        "this run went.",
        "",
    ]
    return "\n".join(lines)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {k: v for k, v in report["results"].items() if "error" not in v}
    names = list(results)
    bw = report["memory_bandwidth_bytes_s"]
    fig, (decode, prefill) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(names))
    decode.bar(x, [results[n]["decode_tok_s"] for n in names], color="tab:blue", label="measured")
    decode.scatter(
        x,
        [roofline(bw, results[n]) for n in names],
        color="black",
        marker="_",
        s=400,
        zorder=3,
        label="roofline (bandwidth / bytes per token)",
    )
    decode.set_xticks(x, names, rotation=20)
    decode.set_ylabel("decode tokens/s")
    decode.set_ylim(top=1.3 * max(roofline(bw, results[n]) for n in names))  # room for the legend
    decode.legend(loc="upper left")
    width = 0.27
    for k, n in enumerate(PROMPTS):
        values = [results[name]["prefill_tok_s"][str(n)] for name in names]
        prefill.bar(x + (k - 1) * width, values, width, label=f"{n}-token prompt")
    prefill.set_xticks(x, names, rotation=20)
    prefill.set_ylabel("prefill tokens/s")
    prefill.legend()
    fig.suptitle("glm_numpy vs llama.cpp and torch bf16, ChatGLM2-6B (random weights), 2 threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gguf_file(args: argparse.Namespace, type: str) -> Path:
    """CKPT/6b-<type>.gguf, exported from the fp16 checkpoint the first time."""
    from llamacpp import gguf_file as exported

    from glm_numpy.assets import default_model_path

    tokenizer = args.tokenizer or REAL_TOKENIZER
    if not tokenizer.is_file():
        tokenizer = default_model_path() / "tokenizer.model"
    return Path(exported(args.checkpoints, type, tokenizer).name)


def llamacpp_ratios(results: dict, prompts) -> list[str]:
    from llamacpp import ratios

    return ratios(results, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, metavar="CKPT", help="required")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument(
        "--tokenizer", type=Path, help="tokenizer.model for the GGUF files (default: the real one)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="run every format this many times")
    parser.add_argument(
        "--openblas-unset",
        action="store_true",
        help="also run the 16-bit formats with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--lock", type=Path, help="run each format under flock LOCK")
    parser.add_argument("--worker", nargs=2, metavar=("RUNNER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        runner, directory = args.worker
        probe_buffer(DECODE_PROBE_GIB)
        if runner == "torch":
            result = run_torch(Path(directory))
        elif runner == "llamacpp":
            result = run_llamacpp(Path(directory))
        else:
            result = run_glm_numpy(Path(directory), compute=GLM_NUMPY_RUNNERS[runner])
        print(json.dumps(result))
        return

    if args.checkpoints is None:
        parser.error("--checkpoints CKPT is required (the directory of the 6b-* checkpoints)")
    from glm_numpy import kernels  # noqa: F401  (sets OpenMP's spin before numba's pool starts)

    report = {
        "machine": cpu_description(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "environment": ", ".join(
            [
                f"{k}={os.environ.get(k, '(unset)')}"
                for k in (
                    "OPENBLAS_CORETYPE",
                    "OPENBLAS_L2_SIZE",
                    "OPENBLAS_THREAD_TIMEOUT",
                    "OMP_WAIT_POLICY",
                    "GOMP_SPINCOUNT",
                )
            ]
            + [f"OpenBLAS kernels: {openblas_core()}"]
        ),
        "memory_bandwidth_bytes_s": memory_bandwidth(),
        "numpy_sgemm_gflops": {str(n): sgemm_gflops(n) for n in PROMPTS},
        "kernel_prefill_gflops": {str(n): kernel_prefill_gflops(n) for n in PROMPTS},
        "results": {},
    }
    print(json.dumps(report, indent=1), flush=True)
    runs = glm_numpy_runs(args.formats.split(","), args.openblas_unset)
    if not args.no_llamacpp:
        runs += [(f"llama.cpp {t}", "llamacpp", gguf_file(args, t), False) for t in LLAMA_CPP_TYPES]
    if not args.no_torch:
        runs.append((f"torch {TORCH_FORMAT}", "torch", FORMATS[TORCH_FORMAT], False))
    for round_ in range(1, args.rounds + 1):
        for name, runner, folder, unset_openblas in runs:
            result = run_in_subprocess(runner, args.checkpoints / folder, unset_openblas, args.lock)
            result = json.loads(json.dumps(result))  # prompt lengths as string keys, as in the file
            name = name if args.rounds == 1 else f"{name}, round {round_}"
            report["results"][name] = result
            print(name, json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "performance.json").write_text(json.dumps(report, indent=1) + "\n")
    page = args.out / "performance.md"
    earlier = page.read_text() if page.exists() else ""
    page.write_text(markdown(report) + sections_of_other_benchmarks(earlier))
    chart(report, args.out / "performance.png")


if __name__ == "__main__":
    main()
