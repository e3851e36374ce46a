"""Benchmark ``glm-numpy serve``: what continuous batching buys on the full-size model.

    python -m pip install -e ".[serve-test]"
    flock /tmp/glm6b.lock python benchmarks/bench_serve.py --checkpoints /work/ckpt

For each format (a server process of its own, one after the other, so only one model is ever in
memory), with the real tokenizer beside the random weights:

- aggregate decode tokens/s with 1, 2, 4 and 8 concurrent streams: the streams are started, and
  once every one of them has its first token, the tokens all of them receive until each has
  received --tokens more are counted over that time (every row is decoding together then; one
  stream chunk per token);
- time to first token of a short request (a 16-token prompt, one new token) on an idle server
  and while 4 other streams are decoding (medians of 3).

Each figure is the best of --rounds runs, the rounds interleaving all the settings: the machine
is shared, and other work only ever makes a run slower.

Prints a Markdown table (docs/performance.md, "Serving"). Not a test: it needs the 6B
checkpoints and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"int4": "6b-int4", "fp16": "6b-safetensors"}
TOKENIZER = REPO.parent / "shared" / "data" / "chatglm2-tokenizer" / "tokenizer.model"
PROMPT = "The quick brown fox jumps over the lazy dog while the {} cat sleeps."  # ~16 tokens
LONG = 2000  # max_tokens of a background stream: it is closed long before
LOADED_STREAMS = 4  # streams decoding while the time to first token under load is measured


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(checkpoint: Path, tokenizer: Path, into: Path) -> Path:
    """The checkpoint's files and the tokenizer, linked into one directory."""
    into.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "tokenizer.model":
            (into / f.name).symlink_to(f.resolve())
    (into / "tokenizer.model").symlink_to(tokenizer.resolve())
    return into


class Stream(threading.Thread):
    """One streamed completion, recording when each chunk arrived; close() hangs up."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.times: list[float] = []
        self.started = time.perf_counter()
        self._hang_up = threading.Event()

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0}
        body["stream"] = True
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=None) as r:
            for line in r.iter_lines():
                if self._hang_up.is_set() or line == "data: [DONE]":
                    return
                if line.startswith("data: "):
                    self.times.append(time.perf_counter())

    def close(self) -> None:
        self._hang_up.set()


def aggregate_decode(url: str, streams: int, tokens: int) -> float:
    """Tokens/s over all streams while every one of them is decoding."""
    running = [Stream(url, PROMPT.format(i), LONG) for i in range(streams)]
    for s in running:
        s.start()
    while not all(s.times for s in running):
        time.sleep(0.01)
    start = time.perf_counter()
    counts = [len(s.times) for s in running]
    while any(len(s.times) - c < tokens for s, c in zip(running, counts)):
        time.sleep(0.01)
    end = time.perf_counter()
    received = sum(sum(start < t <= end for t in s.times) for s in running)
    for s in running:
        s.close()
    for s in running:
        s.join()
    wait_idle(url)
    return received / (end - start)


def first_token_seconds(url: str) -> float:
    """Time to the first chunk of a short streamed request with one new token."""
    body = {"prompt": PROMPT.format("grey"), "max_tokens": 1, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=None) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return time.perf_counter() - started
    raise RuntimeError("no chunk came")


def ttft(url: str, background: int, repeats: int = 3) -> float:
    running = [Stream(url, PROMPT.format(f"b{i}"), LONG) for i in range(background)]
    for s in running:
        s.start()
    while not all(len(s.times) >= 2 for s in running):  # all decoding
        time.sleep(0.01)
    seconds = [first_token_seconds(url) for _ in range(repeats)]
    for s in running:
        s.close()
    for s in running:
        s.join()
    wait_idle(url)
    return statistics.median(seconds)


def wait_idle(url: str) -> None:
    while True:
        health = httpx.get(f"{url}/health", timeout=30).json()
        if health["active"] == 0 and health["queued"] == 0:
            return
        time.sleep(0.05)


def bench_format(name: str, directory: Path, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "glm_numpy.cli", "serve", "--model", str(directory)]
    max_batch = max(*args.streams, LOADED_STREAMS + 1)  # room for the short request beside them
    command += ["--port", str(port), "--max-batch", str(max_batch)]
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{name}.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the {name} server exited; see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        first_token_seconds(url)  # warm-up
        result = {"format": name, "decode": {n: 0.0 for n in args.streams}}
        ttfts = {"ttft_idle": [], "ttft_loaded": []}
        for _ in range(args.rounds):  # rounds interleave the settings, so that a burst of
            for n in args.streams:  # other work on the machine does not hit one of them alone
                measured = aggregate_decode(url, n, args.tokens)
                result["decode"][n] = max(result["decode"][n], measured)
                print(f"{name}: {n} streams {measured:.2f} tok/s", flush=True)
            ttfts["ttft_idle"].append(ttft(url, 0))
            ttfts["ttft_loaded"].append(ttft(url, LOADED_STREAMS))
        result.update({key: min(values) for key, values in ttfts.items()})
        print(
            f"{name}: ttft idle {result['ttft_idle']:.2f} s, 4 streaming "
            f"{result['ttft_loaded']:.2f} s",
            flush=True,
        )
        return result
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()


def markdown(results: list[dict], streams: list[int]) -> str:
    head = ["format"] + [f"{n} stream{'s' * (n > 1)} tok/s" for n in streams]
    head += ["4 / 1", "8 / 1", "TTFT idle s", "TTFT, 4 streaming s", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        d = r["decode"]
        cells = [r["format"]] + [f"{d[n]:.2f}" for n in streams]
        cells += [f"{d[4] / d[1]:.2f}x" if 4 in d else "", f"{d[8] / d[1]:.2f}x" if 8 in d else ""]
        ratio = r["ttft_loaded"] / r["ttft_idle"]
        cells += [f"{r['ttft_idle']:.2f}", f"{r['ttft_loaded']:.2f}", f"{ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=24, help="tokens counted per stream")
    parser.add_argument("--rounds", type=int, default=2, help="the best of this many runs")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats:
            directory = model_dir(
                args.checkpoints / FORMATS[name], args.tokenizer, Path(tmp) / name
            )
            results.append(bench_format(name, directory, args))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"\n{stamp}, {os.cpu_count()} cores, {args.tokens} tokens per stream counted, "
        f"best of {args.rounds} rounds\n"
    )
    print(markdown(results, args.streams))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
