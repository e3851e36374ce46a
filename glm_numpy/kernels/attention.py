"""Attention over the KV cache that scales to long contexts: tiled, online softmax, GQA-aware.

    q [T, H, Dh], keys/values [S, G, Dh] (float32, float16 or bfloat16 bits as uint16; head h
    reads group h // (H/G)), allowed [T, S] bool
    -> context [T, H, Dh] = attend(masked_softmax(attention_scores(q, keys), allowed), values)

The readable definition is glm_numpy.layers.attention; this computes the same function
(tests/test_long_context.py) without ever holding the [H, T, S] score matrix:

- GQA-aware: the r = H/G query heads of one kv group are stacked into one matrix of
  (token, head) rows [Tq * r, Dh], so each key and value row is read once per group and the
  inner products are matrix products (BLAS sgemm), not one dot product per (head, key);
- tiled: (group, query block) x key block tiles of at most TILE_SCORES scores; keys that no
  query of a block may see (the causal future, left padding) are never visited;
- online softmax: each query row keeps its running maximum, running sum and unnormalised output;
  a new key block rescales them by exp(old max - new max) (flash attention's recurrence), so the
  result equals the softmax over all keys at once;
- the exponentials run in a numba kernel with a polynomial exp (below) that LLVM vectorises
  (numba has no vector exp without Intel's SVML);
- a 16-bit cache is widened to float32 one key block at a time (into a buffer that stays in
  cache), never as a whole.

Parallel over (group, query block): each such job runs on a Python thread (numba's thread count
of them; numpy and the numba kernels release the GIL) with OpenBLAS set to one thread for the
duration. Letting OpenBLAS split each tile's sgemm between the cores instead, with the softmax
in between on numba's pool, made the cores wait on each other at every hand-off: 5 GFLOP/s
instead of 50-66 for a 512-token chunk at an 8K context on the (loaded) 2-core VM.

A decoded token (up to DECODE_TOKENS query tokens) goes to ``decode_attention``, heads in lanes:
the r = H/G = 16 query heads of a kv group sit in the 16 float32 lanes of an AVX-512 register.

- scores: key s gives the 16-lane vector sum_d q[d] * k[s, d], q[d] a vector of the heads' d-th
  values and k[s, d] broadcast (an FMA's memory operand): no horizontal sums; 8 keys per step,
  so each q[d] loaded serves 8 FMAs and 8 accumulators hide the FMA latency;
- the online softmax is lane-wise (a running maximum and sum per head, exp_nonpositive);
- output: acc[d] (16 lanes) += p[s] * v[s, d] broadcast, 16 values of d at a time, their 16
  accumulators in registers over a block of 128 keys;
- those two loops are LLVM IR (score_keys, weigh_values16): numba's loops neither keep 16-lane
  accumulators in registers nor vectorise across heads; a 16-bit cache is widened 128 keys at a
  time with vector loads (numba's loop over a view of the cache ran at 2.7 GB/s);
- one parallel numba call per layer: a job per (token, group, chunk of 16 heads, key split); the
  splits' (maximum, sum, output) are merged afterwards (flash-decoding), so both cores work with
  ChatGLM2's G = 2. Other r (the tests' tiny models) use 16-head chunks, the last zero-padded.

Measured at 6B's decode shapes (T=1, H=32, G=2, Dh=128), one layer, ms, median of 8-20 on the
2-core VM under the benchmark lock, tiled -> heads in lanes: fp32 S=2048 0.40 -> 0.18, S=8192
1.40 -> 0.52, S=32768 8.8 -> 3.0; float16 S=2048 1.04 -> 0.20, S=8192 3.8 -> 0.63-1.4, S=32768
14.6 -> 3.2. With other benchmarks running beside it (load 4) both slow down, the gain stays
2-6x: fp32 S=8192 2.8 -> 1.3, S=32768 12.2 -> 6.3, float16 S=8192 13.2 -> 1.7. End to end
(benchmarks/bench_long_context.py glm_decode, 6b-int4, 8K context): decode at 8K / decode at 16
tokens in the same process 0.60 (4.8 / 8.0 tok/s) before, 0.77 (8.3 / 10.8) and 0.85 (5.1 / 6.0)
in two runs after, on the shared VM.

A small prefill (more than DECODE_TOKENS tokens over a short cache) is not worth the tiles'
Python overhead: ``direct_attention`` does it in one numba call on the calling thread, one
(head, query) pair at a time.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from glm_numpy.kernels.bits import bf16_bits_to_float32, fp16_bits_to_float32
from glm_numpy.kernels.matvec import FASTMATH

# Up to this many multiply-adds (T * H * S * Dh) the direct kernel, on one thread, beats the
# tiles (a few numpy calls per group and a hand-off to the worker threads); measured at 6B decode
# shapes (T=1, H=32, Dh=128) before decode_attention took those over, direct vs tiled, ms: S=64
# 0.05 vs 0.09, S=256 0.22 vs 0.13, S=1024 1.6 vs 0.4 (best of 5, loaded VM).
DIRECT_WORK = 1 << 19
# Scores per tile ([Tq * r, Sk] float32): 512 x 1024 = 2 MiB, the size of one core's L2.
TILE_SCORES = 1 << 19
TILE_ROWS = 512  # query rows (token, head) per tile: enough for sgemm to run near its peak
# Below this many query rows (a decoded token has r = 16) scores are computed as keys @ rows.T
# and transposed: single-threaded OpenBLAS, [8192, 128] keys, 16 rows: 0.84 vs 1.28 ms.
WIDE_ROWS = 128
# Keys per tile at most (a decoded token's 16 rows would allow 32K): a 16-bit block widened to
# float32, 2048 x 128 x 4 B = 1 MiB, stays in L2 between its widening and its sgemm.
KEY_BLOCK = 2048
# Up to this many query tokens decode_attention (heads in lanes, below) does the work, whatever
# the cache length: 6B shapes (H=32, G=2, Dh=128), causal, best of 4-30 on the loaded VM, lanes
# vs tiled, ms: S=8192 T=1 0.52 vs 2.28, T=4 1.84 vs 3.10, T=16 6.9 vs 12.4, T=64 31 vs 45;
# T=1 S=16 0.05 vs 0.09 (direct 0.06), S=256 0.06 vs 0.16 (direct 0.87). It reads the cache once
# per token, so long prefill chunks stay with the tiles (a larger bound is not measured yet).
DECODE_TOKENS = 16


def attention_context(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """q [T, H, Dh], keys/values [S, G, Dh], allowed [T, S] bool -> context [T, H, Dh]."""
    T, H, Dh = q.shape
    S = keys.shape[0]
    allowed = np.ascontiguousarray(allowed, dtype=np.bool_)
    if T <= DECODE_TOKENS:
        return decode_attention(q, keys, values, allowed)
    if T * H * S * Dh <= DIRECT_WORK:
        return direct_attention(q, widened(keys), widened(values), allowed)
    return tiled_attention(q, keys, values, allowed)


def widened(array: np.ndarray) -> np.ndarray:
    """A float32 array of the same values (float16, bfloat16 bits as uint16, or float32)."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(array, dtype=np.float32)


# ---------------------------------------------------------------------------- tiles
def tiled_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """attention_context by (group, query block) x key block tiles (module docstring)."""
    T, H, Dh = q.shape
    G = keys.shape[1]
    r = H // G  # query heads per kv group
    out = np.empty((T, G, r, Dh), dtype=np.float32)
    # 1/sqrt(Dh) goes on the queries once instead of on every score.
    q_scaled = q.reshape(T, G, r, Dh) * np.float32(1.0 / np.sqrt(Dh))  # [T, G, r, Dh]
    first, last = allowed_span(allowed)  # [T] each: the first and last key each query may see
    tokens_per_block = max(1, TILE_ROWS // r)
    jobs = [
        (g, t0, min(T, t0 + tokens_per_block))
        for g in range(G)
        for t0 in range(0, T, tokens_per_block)
    ]

    def attend_block(job: tuple[int, int, int]) -> None:
        g, t0, t1 = job
        span = int(first[t0:t1].min()), int(last[t0:t1].max()) + 1
        rows = q_scaled[t0:t1, g].reshape(-1, Dh)  # [Tq * r, Dh]: (token, head) rows
        context = attend_rows(rows, r, keys, values, g, allowed[t0:t1], span)  # [Tq * r, Dh]
        out[t0:t1, g] = context.reshape(t1 - t0, r, Dh)

    run_jobs(attend_block, jobs)
    return out.reshape(T, H, Dh)


def attend_rows(rows, r, keys, values, g, allowed, span) -> np.ndarray:
    """rows [Tq * r, Dh] (scaled queries of group g; row i is token i // r) against keys and
    values [S, G, Dh], allowed [Tq, S], keys span[0]:span[1] -> context [Tq * r, Dh]."""
    Dh = rows.shape[1]
    key_block = min(KEY_BLOCK, max(64, TILE_SCORES // len(rows)))
    buffer = np.empty((2, min(key_block, span[1] - span[0]), Dh), dtype=np.float32)
    top = np.full(len(rows), -np.inf, dtype=np.float32)  # [Tq * r] running maximum
    total = np.zeros(len(rows), dtype=np.float32)  # [Tq * r] running sum of exp
    acc = np.zeros((len(rows), Dh), dtype=np.float32)  # [Tq * r, Dh] unnormalised output
    for s0 in range(span[0], span[1], key_block):
        s1 = min(span[1], s0 + key_block)
        k = key_block_f32(keys, g, s0, s1, buffer[0])  # [Sk, Dh]
        v = key_block_f32(values, g, s0, s1, buffer[1])  # [Sk, Dh]
        if len(rows) < WIDE_ROWS:  # OpenBLAS is faster at [Sk, Dh] @ [Dh, 16] than the reverse
            scores = np.ascontiguousarray((k @ rows.T).T)  # [Tq * r, Sk]
        else:
            scores = rows @ k.T  # [Tq * r, Sk]
        online_softmax_step(scores, allowed[:, s0:s1], r, top, total, acc)
        acc += scores @ v  # scores now hold exp(score - top)
    return acc / total[:, None]


def run_jobs(work, jobs: list) -> None:
    """work(job) for every job, on as many threads as numba may use, each calling BLAS on
    one thread (so the cores never wait on each other inside a small sgemm); on the calling
    thread alone if numpy's BLAS is not an OpenBLAS whose thread count can be set."""
    workers = min(len(jobs), numba.get_num_threads())
    blas = _openblas_threads()
    if workers < 2 or blas is None:
        for job in jobs:
            work(job)
        return
    set_threads, get_threads = blas
    with _ONE_BLAS_THREAD:  # the thread count is process-wide: one attention call at a time
        before = get_threads()
        set_threads(1)
        try:
            list(_pool(workers).map(work, jobs))
        finally:
            set_threads(before)


_ONE_BLAS_THREAD = threading.Lock()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="glm-attention")


@functools.cache
def _openblas_threads():
    """(set_num_threads, get_num_threads) of the OpenBLAS numpy loaded, found by its path in
    /proc/self/maps (Linux), or None."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "openblas" in line}
    for path in sorted(p for p in paths if p.startswith("/")):
        library = ctypes.CDLL(path)
        for suffix in ("", "64_"):
            for prefix in ("openblas", "scipy_openblas"):
                setter = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


def allowed_span(allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """allowed [T, S] bool -> (first, last) [T] int: the span of keys each query may see (a
    query that may see nothing gets the empty span first = S, last = -1... never used: every
    query of the model sees at least itself)."""
    S = allowed.shape[1]
    seen = allowed.any(axis=1)  # [T]
    first = np.where(seen, allowed.argmax(axis=1), S)
    last = np.where(seen, S - 1 - allowed[:, ::-1].argmax(axis=1), -1)
    return first, last


def key_block_f32(cache: np.ndarray, g: int, s0: int, s1: int, buffer: np.ndarray) -> np.ndarray:
    """cache [S, G, Dh] -> rows s0:s1 of group g as float32 [Sk, Dh]: a view of a float32 cache
    (BLAS reads it with its row stride), a widened copy in buffer of a 16-bit one."""
    if cache.dtype == np.float32:
        return cache[s0:s1, g]
    block = buffer[: s1 - s0]
    if cache.dtype == np.float16:
        widen_fp16_rows(cache.view(np.uint16), g, s0, block)
    else:
        widen_bf16_rows(cache, g, s0, block)
    return block


@njit(nogil=True, cache=True)
def widen_fp16_rows(bits, g, s0, out):
    """bits [S, G, Dh] fp16 bits -> out [n, Dh] float32 = rows s0:s0+n of group g."""
    for s in range(out.shape[0]):
        row = bits[s0 + s, g]
        for d in range(out.shape[1]):
            out[s, d] = fp16_bits_to_float32(row[d])


@njit(nogil=True, cache=True)
def widen_bf16_rows(bits, g, s0, out):
    """bits [S, G, Dh] bfloat16 bits -> out [n, Dh] float32 = rows s0:s0+n of group g."""
    for s in range(out.shape[0]):
        row = bits[s0 + s, g]
        for d in range(out.shape[1]):
            out[s, d] = bf16_bits_to_float32(row[d])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def online_softmax_step(scores, allowed, r, top, total, acc):
    """One key block of the online softmax, in place.

    scores [Tq * r, Sk] (already scaled; row i is token i // r) -> exp(score - new top), 0 where
    not allowed [Tq, Sk]; top, total [Tq * r] and acc [Tq * r, Dh] rescaled to the new maximum.
    The caller then adds scores @ values to acc.
    """
    lanes = np.empty(LANES, dtype=np.float32)
    for i in range(scores.shape[0]):
        row, mask = scores[i], allowed[i // r]
        new_top = max(top[i], _masked_max(row, mask, lanes))
        if new_top == -np.inf:  # nothing allowed yet: this block adds nothing
            row[:] = 0.0
            continue
        block_total = np.float32(0.0)
        for s in range(row.shape[0]):
            p = exp_nonpositive(row[s] - new_top) if mask[s] else np.float32(0.0)
            row[s] = p
            block_total += p
        rescale = exp_nonpositive(top[i] - new_top)  # 0 on the first block (top = -inf)
        total[i] = total[i] * rescale + block_total
        for d in range(acc.shape[1]):
            acc[i, d] *= rescale
        top[i] = new_top


LANES = 16  # one AVX-512 register of float32


@njit(inline="always", fastmath=FASTMATH)
def _masked_max(row, mask, lanes):
    """max of row [n] where mask [n] (-inf if nowhere), in LANES running maxima: LLVM does not
    vectorise a single float max reduction (it would need no-NaN semantics); this it does, 2.4x
    faster on a [512, 1024] tile."""
    lanes[:] = -np.inf
    whole = row.shape[0] // LANES * LANES
    for s0 in range(0, whole, LANES):
        for j in range(LANES):
            lanes[j] = max(lanes[j], row[s0 + j] if mask[s0 + j] else np.float32(-np.inf))
    top = np.float32(-np.inf)
    for j in range(LANES):
        top = max(top, lanes[j])
    for s in range(whole, row.shape[0]):
        top = max(top, row[s] if mask[s] else np.float32(-np.inf))
    return top


# ---------------------------------------------------------------------------- exp
@intrinsic
def _float32_from_bits(typingctx, bits):
    """int64 holding 32 bits -> the float32 with those bits (numba computes integers as int64)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


LOG2E = np.float32(1.4426950408889634)
LN2_HIGH = np.float32(0.693145751953125)  # ln 2 in two parts (Cody and Waite): n * LN2_HIGH is
LN2_LOW = np.float32(1.428606765330187e-06)  # exact for |n| < 2^8, so f below keeps its bits
# 1/k! for the Taylor series of e^f, |f| <= ln(2)/2, to degree 7: error < 1e-8 relative.
_C = tuple(np.float32(1.0 / np.prod(np.arange(1, k + 1))) for k in range(8))


@njit(inline="always", fastmath=FASTMATH)
def exp_nonpositive(x):
    """exp(x) for float32 x <= 0 (-inf -> 0; below -87, where float32 underflows, 0).

    exp(x) = 2^n e^f with n = round(x / ln 2) and f = x - n ln 2; e^f by its series, 2^n put
    into the exponent bits. Pure arithmetic and a bit cast, so LLVM vectorises loops that call
    it (numba's np.exp is a scalar libm call without Intel's SVML)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * LOG2E + np.float32(0.5))
    f = (x - n * LN2_HIGH) - n * LN2_LOW
    p = _C[7]
    p = p * f + _C[6]
    p = p * f + _C[5]
    p = p * f + _C[4]
    p = p * f + _C[3]
    p = p * f + _C[2]
    p = p * f + _C[1]
    p = p * f + _C[0]
    scale = _float32_from_bits((np.int64(n) + 127) << 23)  # 2^n: n + bias in the exponent bits
    return p * scale if x > np.float32(-87.0) else np.float32(0.0)


# ---------------------------------------------------------------------------- direct
def direct_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """attention_context for small problems: one numba call, float32 keys and values."""
    out = np.empty(q.shape, dtype=np.float32)
    fused_attention_serial(np.ascontiguousarray(q, dtype=np.float32), keys, values, allowed, out)
    return out


@njit(cache=True, fastmath=FASTMATH)
def fused_attention_serial(q, keys, values, allowed, out):
    """Fill out [T, H, Dh] (see direct_attention), one (head, query) pair after another."""
    T, H = q.shape[0], q.shape[1]
    for job in range(H * T):
        _attend_one(job // T, job % T, q, keys, values, allowed, out)


@njit(inline="always", fastmath=FASTMATH)
def _attend_one(h, t, q, keys, values, allowed, out):
    """out[t, h] = softmax over the allowed keys of q[t, h] · keys[:, g] / sqrt(Dh), applied to
    values[:, g], with g = h // (H/G)."""
    H, Dh = q.shape[1], q.shape[2]
    S, G = keys.shape[0], keys.shape[1]
    g = h // (H // G)
    inverse_sqrt = np.float32(1.0 / np.sqrt(Dh))
    weights = np.zeros(S, dtype=np.float32)  # [S]: scores, then unnormalised probabilities
    top = -np.inf
    for s in range(S):
        if allowed[t, s]:
            dot = np.float32(0.0)
            for d in range(Dh):
                dot += q[t, h, d] * keys[s, g, d]
            weights[s] = dot * inverse_sqrt
            top = max(top, weights[s])
    total = np.float32(0.0)
    for s in range(S):
        if allowed[t, s]:  # subtracting the maximum keeps exp() from overflowing
            weights[s] = np.exp(weights[s] - top)
            total += weights[s]
        else:
            weights[s] = 0.0
    for d in range(Dh):
        out[t, h, d] = 0.0
    for s in range(S):
        p = weights[s] / total
        if p != 0.0:
            for d in range(Dh):
                out[t, h, d] += p * values[s, g, d]


# ---------------------------------------------------------------------- decode: heads in lanes
# Keys per step of the score loop: 8 accumulators hide the 4-cycle latency of the FMAs, and each
# query vector loaded serves 8 of them.
DECODE_KEYS = 8
# Keys per online-softmax block: scores [128, 16] (8 KiB) and, for a 16-bit cache, the widened
# keys and values [128, Dh] (64 KiB each at Dh = 128) stay in L1 / L2 between their uses.
DECODE_BLOCK = 128
# Keys per split at least (fewer splits on short caches: each one costs a merge).
DECODE_SPLIT = 512

_ints = ir.VectorType(ir.IntType(32), 16)
_f32 = ir.FloatType()
_floats = ir.VectorType(_f32, LANES)
_i64 = ir.IntType(64)


def decode_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, allowed: np.ndarray
) -> np.ndarray:
    """attention_context for a few query tokens over a long cache (see lanes_attention)."""
    T, H, Dh = q.shape
    G = keys.shape[1]
    r = H // G
    chunks = -(-r // LANES)  # 16-lane chunks of a group's heads (the last one zero-padded)
    padded = np.zeros((T, G, chunks * LANES, Dh), dtype=np.float32)
    padded[:, :, :r] = q.reshape(T, G, r, Dh) * np.float32(1.0 / np.sqrt(Dh))
    # [T, G, chunks, Dh, LANES]: for each d, the 16 heads' q[d] side by side
    lanes_q = np.ascontiguousarray(padded.reshape(T, G, chunks, LANES, Dh).swapaxes(3, 4))
    first, last = allowed_span(allowed)
    begin, end = int(first.min()), int(last.max()) + 1
    groups = T * G * chunks
    splits = max(1, min(-(-2 * numba.get_num_threads() // groups), (end - begin) // DECODE_SPLIT))
    starts = np.linspace(begin, end, splits + 1).astype(np.int64)  # [splits + 1] key boundaries
    top = np.empty((groups * splits, LANES), dtype=np.float32)
    total = np.empty((groups * splits, LANES), dtype=np.float32)
    acc = np.empty((groups * splits, Dh, LANES), dtype=np.float32)
    fp16 = keys.dtype == np.float16
    lanes_attention(
        lanes_q, _lane_rows(keys), _lane_rows(values), allowed, fp16, starts, top, total, acc
    )
    # flash-decoding's merge: the splits' sums, each rescaled to the overall maximum
    top = top.reshape(groups, splits, LANES)
    weight = np.exp(top - top.max(axis=1, keepdims=True))  # [groups, splits, LANES]
    total = (total.reshape(groups, splits, LANES) * weight).sum(axis=1)  # [groups, LANES]
    acc = (acc.reshape(groups, splits, Dh, LANES) * weight[:, :, None]).sum(axis=1)
    context = (acc / total[:, None]).reshape(T, G, chunks, Dh, LANES).swapaxes(3, 4)
    return context.reshape(T, G, chunks * LANES, Dh)[:, :, :r].reshape(T, H, Dh)


def _lane_rows(cache: np.ndarray) -> np.ndarray:
    """cache [S, G, Dh] -> float32 or uint16 (16-bit bits), each row's Dh values contiguous."""
    if cache.dtype == np.float16:
        cache = cache.view(np.uint16)
    if cache.strides[2] != cache.itemsize:
        cache = np.ascontiguousarray(cache)
    return cache


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def lanes_attention(q, keys, values, allowed, fp16, starts, top, total, acc):
    """One job per (token, group, chunk of 16 heads, key split) on numba's threads.

    q [T, G, C, Dh, LANES] (scaled, heads in lanes), keys/values [S, G, Dh] (float32, or 16-bit
    bits: fp16 if fp16 else bf16), allowed [T, S], starts [splits + 1] -> for each job j (in that
    order) its softmax state over keys starts[split]:starts[split + 1]: top, total [j, LANES],
    acc [j, Dh, LANES] (unnormalised)."""
    T, G, C = q.shape[0], q.shape[1], q.shape[2]
    splits = len(starts) - 1
    for job in prange(T * G * C * splits):
        split, rest = job % splits, job // splits
        c, rest = rest % C, rest // C
        g, t = rest % G, rest // G
        attend_split(
            q[t, g, c], keys, values, allowed[t], g, fp16, starts[split], starts[split + 1],
            top[job], total[job], acc[job],
        )  # fmt: skip


@njit(inline="always", fastmath=FASTMATH)
def attend_split(q, keys, values, allowed, g, fp16, begin, end, top, total, acc):
    """The online softmax of one split, heads in lanes: q [Dh, LANES] against keys begin:end of
    group g -> top, total [LANES] and acc [Dh, LANES], a key block of DECODE_BLOCK at a time."""
    Dh = q.shape[0]
    top[:] = -np.inf
    total[:] = 0.0
    acc[:] = 0.0
    scores = np.empty((DECODE_BLOCK, LANES), dtype=np.float32)  # then exp(score - top)
    widened_keys = np.empty((DECODE_BLOCK, Dh), dtype=np.float32)  # used by 16-bit caches
    widened_values = np.empty((DECODE_BLOCK, Dh), dtype=np.float32)
    block_top = np.empty(LANES, dtype=np.float32)
    for s0 in range(begin, end, DECODE_BLOCK):
        n = min(DECODE_BLOCK, end - s0)
        mask = allowed[s0 : s0 + n]
        if not mask.any():
            continue
        k, k_stride = float32_rows(keys, g, s0, n, fp16, widened_keys)
        for s in range(0, n, DECODE_KEYS):
            score_keys(
                q.ctypes.data, k + s * k_stride, k_stride, min(DECODE_KEYS, n - s), Dh,
                scores[s].ctypes.data,
            )  # fmt: skip
        block_top[:] = -np.inf
        for s in range(n):
            if mask[s]:
                for j in range(LANES):
                    block_top[j] = max(block_top[j], scores[s, j])
        for j in range(LANES):  # every lane sees the same keys: block_top is finite
            new_top = max(top[j], block_top[j])
            block_top[j] = exp_nonpositive(top[j] - new_top)  # the rescale; 0 on the first block
            top[j] = new_top
            total[j] *= block_top[j]
        for d in range(Dh):
            for j in range(LANES):
                acc[d, j] *= block_top[j]
        for s in range(n):
            if mask[s]:
                for j in range(LANES):
                    p = exp_nonpositive(scores[s, j] - top[j])
                    scores[s, j] = p
                    total[j] += p
            else:
                scores[s, :] = 0.0
        v, v_stride = float32_rows(values, g, s0, n, fp16, widened_values)
        whole = Dh // LANES * LANES
        for d in range(0, whole, LANES):
            weigh_values16(scores.ctypes.data, v + 4 * d, v_stride, n, acc[d].ctypes.data)
        for d in range(whole, Dh):
            weigh_values1(scores.ctypes.data, v + 4 * d, v_stride, n, acc[d].ctypes.data)


def float32_rows(cache, g, s0, n, fp16, buffer):
    """(address, row stride in bytes) of rows s0:s0+n of group g as float32: in a float32 cache
    itself, or widened from 16-bit bits into buffer [>= n, Dh]."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(float32_rows, inline="always")
def _float32_rows(cache, g, s0, n, fp16, buffer):
    if cache.dtype == types.float32:
        return lambda cache, g, s0, n, fp16, buffer: (cache[s0, g].ctypes.data, cache.strides[0])

    def widen(cache, g, s0, n, fp16, buffer):
        Dh = buffer.shape[1]
        whole = Dh // LANES  # 16-value vectors per row, then a scalar tail
        for s in range(n):
            row, out = cache[s0 + s, g], buffer[s]
            if whole and fp16:
                widen_fp16_vectors(row.ctypes.data, out.ctypes.data, whole)
            elif whole:
                widen_bf16_vectors(row.ctypes.data, out.ctypes.data, whole)
            for d in range(whole * LANES, Dh):
                if fp16:
                    out[d] = fp16_bits_to_float32(row[d])
                else:
                    out[d] = bf16_bits_to_float32(row[d])
        return buffer.ctypes.data, buffer.strides[0]

    return widen


def _widen_vectors(load):
    """An intrinsic (source, destination, count): count vectors of 16 16-bit values at source ->
    float32 at destination (addresses), whatever the cache's strides (numba's own loop over a
    view of the [S, G, Dh] cache does not vectorise: 2.7 GB/s)."""

    @intrinsic
    def widen_vectors(typingctx, source, destination, count):
        def codegen(context, builder, signature, args):
            source, destination, count = args

            def step(i, _):
                wide = load(builder, _at(builder, source, i, 2 * LANES))
                target = _pointer(builder, _at(builder, destination, i, 4 * LANES), _floats)
                builder.store(wide, target, align=4)
                return []

            _counted_loop(builder, count, [], step)
            return context.get_dummy_value()

        return types.void(types.intp, types.intp, types.intp), codegen

    return widen_vectors


def _load_fp16(builder, address):
    """16 fp16 values at address -> 16 float32 lanes (vcvtph2ps)."""
    halves = builder.load(_pointer(builder, address, ir.VectorType(ir.HalfType(), LANES)), align=2)
    return builder.fpext(halves, _floats)


def _load_bf16(builder, address):
    """16 bf16 values at address -> 16 float32 lanes: each bit pattern becomes a float32's top
    half."""
    bits = builder.load(_pointer(builder, address, ir.VectorType(ir.IntType(16), LANES)), align=2)
    wide = builder.zext(bits, _ints)
    return builder.bitcast(builder.shl(wide, ir.Constant(_ints, [16] * LANES)), _floats)


widen_fp16_vectors = _widen_vectors(_load_fp16)
widen_bf16_vectors = _widen_vectors(_load_bf16)


def _counted_loop(builder: ir.IRBuilder, count, initial: list, body) -> list:
    """for i in range(count) (count >= 1): values = body(i, values), from initial -> the last
    values. Each value is a phi of the loop, so LLVM keeps them in registers."""
    entry = builder.block
    loop = builder.append_basic_block("loop")
    done = builder.append_basic_block("done")
    builder.branch(loop)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    carried = [builder.phi(value.type) for value in initial]
    new = body(i, carried)
    next_i = builder.add(i, ir.Constant(_i64, 1))
    i.add_incoming(ir.Constant(_i64, 0), entry)
    i.add_incoming(next_i, builder.block)
    for phi, start, value in zip(carried, initial, new):
        phi.add_incoming(start, entry)
        phi.add_incoming(value, builder.block)
    builder.cbranch(builder.icmp_signed("<", next_i, count), loop, done)
    builder.position_at_end(done)
    return new


def _pointer(builder, address, element_type):
    return builder.inttoptr(address, element_type.as_pointer())


def _broadcast(builder, address):
    """The float32 at address in all 16 lanes (one vbroadcastss, or an FMA's memory operand)."""
    value = builder.load(_pointer(builder, address, _f32), align=4)
    single = builder.insert_element(
        ir.Constant(_floats, ir.Undefined), value, ir.Constant(_ints.element, 0)
    )
    return builder.shuffle_vector(
        single, ir.Constant(_floats, ir.Undefined), ir.Constant(_ints, None)
    )


def _vector_fma(builder, a, b, c):
    module = builder.module
    function = module.globals.get("llvm.fma.v16f32") or ir.Function(
        module, ir.FunctionType(_floats, [_floats] * 3), "llvm.fma.v16f32"
    )
    return builder.call(function, [a, b, c])


def _at(builder, base, index, step):
    return builder.add(
        base, builder.mul(index, ir.Constant(_i64, step) if isinstance(step, int) else step)
    )


@intrinsic
def score_keys(typingctx, q, k, k_stride, valid, dh, out):
    """out[i] (16 lanes) = sum_d q[d] (16 lanes) * k row i [d] for the DECODE_KEYS rows i at
    k + i * k_stride (rows i >= valid repeat the last valid one; their scores are never used).
    q [dh, LANES] float32, out [DECODE_KEYS, LANES] float32: addresses."""

    def codegen(context, builder, signature, args):
        q, k, k_stride, valid, dh, out = args
        last = builder.sub(valid, ir.Constant(_i64, 1))
        rows = []
        for i in range(DECODE_KEYS):
            index = ir.Constant(_i64, i)
            clamped = builder.select(builder.icmp_signed("<", index, valid), index, last)
            rows.append(_at(builder, k, clamped, k_stride))

        def step(d, sums):
            lanes = builder.load(_pointer(builder, _at(builder, q, d, 4 * LANES), _floats), align=4)
            return [
                _vector_fma(builder, lanes, _broadcast(builder, _at(builder, row, d, 4)), total)
                for row, total in zip(rows, sums)
            ]

        zero = ir.Constant(_floats, None)
        sums = _counted_loop(builder, dh, [zero] * DECODE_KEYS, step)
        for i, total in enumerate(sums):
            address = builder.add(out, ir.Constant(_i64, 4 * LANES * i))
            builder.store(total, _pointer(builder, address, _floats), align=4)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 6), codegen


def _weigh_values(width: int):
    """An intrinsic: acc[i] (16 lanes) += sum_s p[s] (16 lanes) * v row s [i] for i < width,
    p [n, LANES] float32, value rows at v + s * v_stride, acc [width, LANES] float32: addresses.
    The width accumulators stay in registers over all n keys."""

    @intrinsic
    def weigh_values(typingctx, p, v, v_stride, n, acc):
        def codegen(context, builder, signature, args):
            p, v, v_stride, n, acc = args
            addresses = [builder.add(acc, ir.Constant(_i64, 4 * LANES * i)) for i in range(width)]
            initial = [builder.load(_pointer(builder, a, _floats), align=4) for a in addresses]

            def step(s, sums):
                probs = builder.load(
                    _pointer(builder, _at(builder, p, s, 4 * LANES), _floats), align=4
                )
                row = _at(builder, v, s, v_stride)
                return [
                    _vector_fma(
                        builder,
                        probs,
                        _broadcast(builder, builder.add(row, ir.Constant(_i64, 4 * i))),
                        total,
                    )
                    for i, total in enumerate(sums)
                ]

            sums = _counted_loop(builder, n, initial, step)
            for address, total in zip(addresses, sums):
                builder.store(total, _pointer(builder, address, _floats), align=4)
            return context.get_dummy_value()

        return types.void(*[types.intp] * 5), codegen

    return weigh_values


weigh_values16 = _weigh_values(LANES)
weigh_values1 = _weigh_values(1)
