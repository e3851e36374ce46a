"""numba kernels: the hot loops of the forward pass, each tested to agree with the readable
NumPy layer it speeds up (glm_numpy/layers; tests/test_kernels.py).

- bits:     16-bit float bits (uint16) -> float32 inside compiled code (numba has no float16);
- matvec:   decode, y = x @ W.T for a few rows, streaming W once in its stored 16-bit or
            quantised form (the time per token is the time to read the weights from memory);
- intdot:   AVX2 integer dot products for int8/int4 weights (LLVM written with llvmlite);
- widen:    prefill, W widened to float32 a block of rows at a time for BLAS sgemm;
- dispatch: ``project`` picks one of the above for ``glm_numpy.layers.linear``;
- attention, norm: attention over the KV cache and RMSNorm, fused (ChatGLM2.forward uses them
            when no trace is recorded).

Every kernel is compiled on first use and cached on disk (``cache=True``: __pycache__ beside
this package, or numba's per-user cache directory if that is read-only).

Threads: numba runs its parallel loops on an OpenMP pool and numpy's sgemm on OpenBLAS's
threads. Both pools spin-wait between jobs by default, so when a prefill alternates between a
numba widening step and an sgemm the idle pool keeps burning the 2 cores the other one needs
(a 10 ms step became 45 ms). ``OMP_WAIT_POLICY=PASSIVE`` makes OpenMP's workers sleep instead.
OpenMP reads it once, when numba first loads its threading layer, which happens lazily at the
first parallel kernel call — after this import. A value the user set is kept. OpenBLAS's threads
spin for about 2^28 cycles after each sgemm; glm_numpy/__init__.py sets
``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles) before numpy loads OpenBLAS. Measured: the 6B MLP
projection's prefill (``linear``, fp16 [13696, 4096]) 77 -> 91 GFLOP/s at 128 tokens and
100 -> 109 at 512 (medians of 5 runs); the default model's prefill never slower.

Fork: GNU OpenMP cannot run in a process forked from one whose pool has started (numba then
terminates the child). The exercise checker runs students' code in a forked child, and a student
may well call glm_numpy's layers there, so in a forked process ``usable()`` is False and the
callers take the readable NumPy path instead: slower, never wrong.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
