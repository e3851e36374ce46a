"""``project(x, w)`` = x @ W.T for a weight in any stored form, on the numba kernels.

This is what ``glm_numpy.layers.linear`` runs; ``linear_reference`` there is the readable NumPy
definition it is tested against. Three regimes:

- decode (one row of x): W is read once, straight from its stored form, by a matvec kernel —
  the time is the time to stream W from memory;
- more rows (a prompt, a batch of decode steps): tiles of weight rows x rows of x held in
  registers, each weight row read once per block of rows of x. 16-bit weights: float32-exact
  products, outer products of packed panels in 512-bit FMAs (glm_numpy.kernels.tiles: faster
  than widening to float32 + OpenBLAS sgemm at every length measured, 16-512 rows, and
  independent of OpenBLAS's kernel choice); with compute="bf16", vdpbf16ps
  (glm_numpy.kernels.bf16dot). Quantised weights: integer tiles (glm_numpy.kernels.multirow)
  where the CPU has AVX-512 VNNI, x rounded to int8 as in decode, so prompt and decode share one
  function;
- quantised weights the integer kernels cannot take (float32 scales, groups of under 32
  bytes): matvec up to DECODE_ROWS rows, then W widened to float32 BLOCK_ROWS rows at a time
  and multiplied by BLAS sgemm.

float32 weights go to numpy's matmul directly (BLAS is already at the bandwidth limit there).
"""

from __future__ import annotations

import sys

import numpy as np

from glm_numpy.compute import BF16Compute
from glm_numpy.dtypes import BFLOAT16, to_float32
from glm_numpy.kernels import bf16dot, matvec, multirow, tiles, widen
from glm_numpy.kernels.intdot import BLOCK_BYTES, HAS_AVX2, HAS_AVX512_VNNI
from glm_numpy.quantize import QuantizedWeight

DECODE_ROWS = 4  # float kernels for quantised weights: matvec up to this many rows, then sgemm
# Rows widened per sgemm block: 512 x 4096 x 4 B = 8 MiB, inside the 32 MiB L3. 128-256 rows
# measured slower (each block hands the cores from numba's threads to OpenBLAS's and back), 1024
# no faster at 512 tokens and sometimes much slower at 128.
BLOCK_ROWS = 512
# 16-bit decode reads rows in blocks of 4 (the *_pairs kernels) once x [I] float32 outgrows L1
# (8192 columns): at I = 13696 (the MLP's down projection) 22-25 -> 26-30 GB/s, at I = 4096
# blocks were slower (30-32 -> 25-27; glm_numpy.kernels.stream16).
PAIRS_FROM_COLUMNS = 8192
# 16-bit weights: matvec up to this many rows, then tiles' panels (which compute 16 tokens at a
# time). [13696, 4096] fp16, ms: 2 rows matvec 5.4, panels 8.1; 4 rows 6.3 / 7.7; 6 rows 10.4 / 7.8.
SIXTEEN_BIT_MATVEC_ROWS = 4


def project(x: np.ndarray, w) -> np.ndarray:
    """x [T, I], w [O, I] (float32, float16, bfloat16 bits as uint16, or QuantizedWeight)
    -> x @ W.T [T, O] float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # [T, I]
    if isinstance(w, BF16Compute):
        if x.shape[1] != w.shape[1]:
            raise ValueError(
                f"linear: x has {x.shape[1]} features, the weight expects {w.shape[1]}"
            )
        fp16 = w.weight.dtype == np.float16
        return bf16dot.project_bf16(x, _kernel_view(w.weight, np.uint16), fp16)
    if isinstance(w, QuantizedWeight):
        stored = _quantized(w)
    elif w.dtype == np.float32:
        return x @ w.T
    elif w.dtype in (np.float16, BFLOAT16):
        stored = _sixteen_bit(w)
    else:
        raise TypeError(f"linear: cannot multiply by a weight of dtype {w.dtype}")
    rows = stored.rows
    if x.shape[1] != stored.columns:
        raise ValueError(
            f"linear: x has {x.shape[1]} features, the weight expects {stored.columns}"
        )
    if stored.multirow is not None and stored.matvec_rows < x.shape[0] <= stored.multirow_rows:
        return stored.multirow(x)
    if x.shape[0] <= stored.matvec_rows:
        out = np.empty((x.shape[0], rows), dtype=np.float32)  # [T, O]
        stored.matvec(x, out)
        return out
    out_t = np.empty((rows, x.shape[0]), dtype=np.float32)  # [O, T]: each block's rows contiguous
    buffer = np.empty((min(BLOCK_ROWS, rows), stored.columns), dtype=np.float32)  # [rows, I]
    for start in range(0, rows, BLOCK_ROWS):
        block = buffer[: min(BLOCK_ROWS, rows - start)]
        stored.widen(start, block)
        np.matmul(block, x.T, out=out_t[start : start + len(block)])
    out = np.empty((x.shape[0], rows), dtype=np.float32)  # [T, O]
    widen.transpose(out_t, out)
    return out


class _Stored:
    """A weight as the kernels take it: read-only C-contiguous arrays, one kind of kernel each."""

    def __init__(
        self, rows, columns, matvec, widen, multirow=None, multirow_rows=0, matvec_rows=None
    ):
        self.rows, self.columns = rows, columns
        self.matvec = matvec  # (x [T, I], out [T, O]) -> None
        self.widen = widen  # (start, out [n, I]) -> None; None where multirow takes every T
        self.multirow = multirow  # x [T, I] -> [T, O], for matvec_rows < T <= multirow_rows
        self.multirow_rows = multirow_rows
        self.matvec_rows = DECODE_ROWS if matvec_rows is None else matvec_rows


def _kernel_view(array: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous, read-only view (a copy only if the stored array is not contiguous).

    Read-only because memory-mapped checkpoints are: numba compiles a separate specialisation
    for read-only arrays, so every caller passing the same kind keeps it to one compilation."""
    view = np.ascontiguousarray(array).view(dtype)
    view.flags.writeable = False
    return view


def _scale_view(scale: np.ndarray, rows: int) -> np.ndarray:
    """scale [O] or [O, N] (float16/float32/bfloat16 bits) -> [O, N]: float16 scales are kept as
    their bits (the kernels widen them), others are widened to float32 here."""
    scale = scale.reshape(rows, -1)
    if scale.dtype == np.float16:
        return _kernel_view(scale, np.uint16)
    return _kernel_view(to_float32(scale), np.float32)


def _sixteen_bit(w: np.ndarray) -> _Stored:
    bits = _kernel_view(w, np.uint16)  # [O, I]
    pairs = bits.shape[1] > PAIRS_FROM_COLUMNS
    if w.dtype == np.float16:
        mv = matvec.matvec_fp16_pairs if pairs else matvec.matvec_fp16
    else:
        mv = matvec.matvec_bf16_pairs if pairs else matvec.matvec_bf16
    fp16 = w.dtype == np.float16
    return _Stored(
        *bits.shape,
        matvec=lambda x, out: mv(x, bits, out),
        widen=None,
        multirow=lambda x: tiles.project16(x, bits, fp16),
        multirow_rows=sys.maxsize,
        matvec_rows=SIXTEEN_BIT_MATVEC_ROWS,
    )


def _quantized(w: QuantizedWeight) -> _Stored:
    rows, columns = w.shape
    scale = _scale_view(w.scale, rows)  # [O, N]
    stored_group = w.q.shape[1] // scale.shape[1]  # bytes per group of a stored row
    # The integer kernels need whole 32-byte blocks per group and float16 scales.
    integer_dots = HAS_AVX2 and stored_group % BLOCK_BYTES == 0 and scale.dtype == np.uint16
    if w.bits == 8:
        q = _kernel_view(w.q, np.int8)  # [O, I]

        def int8_matvec(x: np.ndarray, out: np.ndarray) -> None:
            if integer_dots:
                matvec.matvec_int8_blocks(x, q, scale, out)
            else:
                matvec.matvec_int8(x, q, scale, out)

        return _Stored(
            rows,
            columns,
            matvec=int8_matvec,
            widen=lambda start, out: widen.widen_int8(q, scale, start, out),
            **_integer_regimes(integer_dots, lambda x: multirow.project_int8(x, q, scale)),
        )
    packed = _kernel_view(w.q, np.uint8)  # [O, I/2]

    def int4_matvec(x: np.ndarray, out: np.ndarray) -> None:
        if integer_dots:
            matvec.matvec_int4_blocks(x, packed, scale, out)
            return
        x_even = np.ascontiguousarray(x[:, 0::2])  # [T, I/2]
        x_odd = np.ascontiguousarray(x[:, 1::2])  # [T, I/2]
        x_group_sums = x.reshape(x.shape[0], scale.shape[1], -1).sum(axis=-1)  # [T, N]
        matvec.matvec_int4(x_even, x_odd, x_group_sums, packed, scale, out)

    return _Stored(
        rows,
        columns,
        matvec=int4_matvec,
        widen=lambda start, out: widen.widen_int4(packed, scale, start, out),
        **_integer_regimes(integer_dots, lambda x: multirow.project_int4(x, packed, scale)),
    )


def _integer_regimes(integer_dots: bool, multirow_kernel) -> dict:
    """Where the weights take integer products, every number of rows rounds x to int8 as decode
    does (one function for prompt and decode): the multi-row kernel with AVX-512 VNNI, else the
    decode kernel over every row. Otherwise the float kernels: matvec, then widening + sgemm."""
    if not integer_dots:
        return {}
    if HAS_AVX512_VNNI:
        return {"multirow": multirow_kernel, "multirow_rows": sys.maxsize, "matvec_rows": 1}
    return {"matvec_rows": sys.maxsize}
