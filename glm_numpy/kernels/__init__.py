"""numba kernels: the hot loops of the forward pass, each tested to agree with the readable
NumPy layer it speeds up (glm_numpy/layers; tests/test_kernels.py).

- bits:     16-bit float bits (uint16) -> float32 inside compiled code (numba has no float16);
- matvec:   decode, y = x @ W.T for a few rows, streaming W once in its stored 16-bit or
            quantised form (the time per token is the time to read the weights from memory);
- stream16: 16-bit decode rows in LLVM IR: 512-bit widening and FMAs, software prefetch;
- intdot:   AVX2 and AVX-512 VNNI integer dot products for int8/int4 weights (LLVM IR
            written with llvmlite), one token at a time or a tile of 2-4 weight rows x 4
            tokens;
- tiles:    prompts and batches over 16-bit weights: outer products over packed panels of
            weight rows and tokens, float32-exact (LLVM IR);
- multirow: prompts and batches over int8/int4 weights on intdot's tiles, x rounded to int8 as
            in decode;
- bf16dot:  compute="bf16": AVX512-BF16 ``vdpbf16ps`` tiles (glm_numpy.compute);
- widen:    prefill of quantised weights the integer kernels cannot take: W widened to float32
            a block of rows at a time for BLAS sgemm;
- dispatch: ``project`` picks one of the above for ``glm_numpy.layers.linear``;
- attention, norm: attention over the KV cache and RMSNorm, fused (ChatGLM2.forward uses them
            when no trace is recorded).

Every kernel is compiled on first use and cached on disk (``cache=True``: __pycache__ beside
this package, or numba's per-user cache directory if that is read-only).

Threads: numba runs its parallel loops on an OpenMP pool and numpy's sgemm on OpenBLAS's
threads. Both pools spin-wait between jobs by default, so when a prefill alternates between a
numba widening step and an sgemm the idle pool keeps burning the 2 cores the other one needs
(a 10 ms step became 45 ms). OpenBLAS's threads spin for about 2^28 cycles after each sgemm;
glm_numpy/__init__.py sets ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles) before numpy loads
OpenBLAS. Measured: the 6B MLP projection's prefill (``linear``, fp16 [13696, 4096]) 77 -> 91
GFLOP/s at 128 tokens and 100 -> 109 at 512 (medians of 5 runs).

OpenMP's workers get a short spin instead: ``GOMP_SPINCOUNT=1000`` (about 20 us, with
``OMP_WAIT_POLICY=ACTIVE``) bridges the few microseconds of Python between two decode kernels,
where a sleeping worker took tens of microseconds to wake ~113 times per token, yet is over long
before an sgemm would feel it. int4 6B decode, ms per token (medians of 10 steps, one process
each, settings alternated 4 times): sleeping workers (``PASSIVE``) 78.7 / 80.3 / 79.5 / 63.4,
spin 1000 63.4 / 76.5 / 61.0 / 61.8; spin 10,000 was as fast but took the 16-token ``linear``
from ~60-100 GFLOP/s to ~40. OpenMP reads these once, when numba first loads its threading layer
(lazily, at the first parallel kernel call, after this import). A user who set either variable
keeps their choice.

Fork: GNU OpenMP cannot run in a process forked from one whose pool has started (numba then
terminates the child). The exercise checker runs students' code in a forked child, and a student
may well call glm_numpy's layers there, so in a forked process ``usable()`` is False and the
callers take the readable NumPy path instead: slower, never wrong.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ["GOMP_SPINCOUNT"] = "1000"

from glm_numpy.kernels.dispatch import project  # noqa: E402  (after the environment is set)

_forked = False


def _note_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_fork)


def usable() -> bool:
    """Whether this process may run the parallel kernels (not in a forked child; see above)."""
    return not _forked


__all__ = ["project", "usable"]
