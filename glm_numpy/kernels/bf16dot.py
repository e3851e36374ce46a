"""bfloat16 products with AVX512-BF16 (``vdpbf16ps``): the opt-in ``compute="bf16"`` mode.

    x [T, I] float32, W [O, I] 16-bit -> out [T, O] ≈ bf16(x) @ bf16(W).T, summed in float32

This is what torch does for a bf16 model on a CPU: the activations are rounded to bfloat16 (8
significant bits) and each ``vdpbf16ps`` multiplies 32 bf16 pairs and adds neighbouring products
into 16 float32 sums: 32 multiply-adds per instruction where float32 FMA does 16, and half the
bytes of x to load. bf16 weights are used as stored; fp16 weights are rounded to bf16 a block of
rows at a time (they lose 3 of their 11 significant bits). docs/numerics.md gives the error
against float32, measured.

The tile kernel (glm_numpy.kernels.tiles' loop, an LLVM loop written with llvmlite) multiplies
ROWS weight rows by TOKENS rows of x: each step loads 4 + 6 vectors of 32 bf16 values and issues
24 ``vdpbf16ps`` into 24 accumulators held in registers. Ragged T, O and I (steps of 32
columns) are padded with zeros.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from glm_numpy.dtypes import float32_to_bfloat16
from glm_numpy.kernels.bits import fp16_bits_to_float32
from glm_numpy.kernels.tiles import ROWS, TOKENS, tile_loop, tile_rows

HAS_AVX512_BF16 = "+avx512bf16" in set(llvm.get_host_cpu_features().flatten().split(","))
STEP = 32  # bf16 values per 64-byte vector

_words = ir.VectorType(ir.IntType(32), 16)  # 32 bf16 values as the instruction's integer view
_floats = ir.VectorType(ir.FloatType(), 16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it)."""

    def _to_string(self) -> str:
        return "bfloat"


_bf16_pairs = ir.VectorType(_BFloat(), 32)


def _load_words(builder: ir.IRBuilder, address) -> ir.Value:
    return builder.load(builder.inttoptr(address, _words.as_pointer()), align=2)


def _dpbf16ps(builder: ir.IRBuilder, acc, a, b) -> ir.Value:
    """acc [16 x float] + a[2i] * b[2i] + a[2i+1] * b[2i+1] in lane i (products exact)."""
    module = builder.module
    name = "llvm.x86.avx512bf16.dpbf16ps.512"
    function = module.globals.get(name) or ir.Function(
        module, ir.FunctionType(_floats, [_floats, _bf16_pairs, _bf16_pairs]), name
    )
    pairs = [builder.bitcast(v, _bf16_pairs) for v in (a, b)]
    return builder.call(function, [acc, *pairs])


@intrinsic
def dot_bf16_tile(typingctx, w, x, steps, w_stride, x_stride, out, out_stride):
    """As tiles.dot_tile_bf16 (ROWS weight rows x TOKENS rows of x), but x is bf16 bits too and
    each step takes 32 columns with one vdpbf16ps per tile entry; steps = I / 32."""

    def codegen(context, builder, sig, args):
        tile_loop(builder, args, 2 * STEP, 2 * STEP, _load_words, _load_words, _dpbf16ps)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 7), codegen


@njit(parallel=True, cache=True)
def rows_bf16_compute(x_bits, w_bits, out):
    """x_bits [T, I] uint16 (bf16), w_bits [O, I] uint16 (bf16) -> out [T, O] = x @ W.T, summed
    in float32; T and O whole tiles, I a multiple of STEP."""
    tile_rows(x_bits, w_bits, out, dot_bf16_tile, STEP)


@intrinsic
def _float_bits(typingctx, value):
    """float32 -> its bits as uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@njit(parallel=True, cache=True)
def fp16_to_bf16_rows(w, start, out):
    """w [O, I] uint16 (fp16 bits) -> out [n, I] uint16 = W[start : start + n] rounded to bf16
    (to nearest even, as glm_numpy.dtypes.float32_to_bfloat16; fp16 values are finite or inf)."""
    for r in prange(out.shape[0]):
        for i in range(out.shape[1]):
            bits = _float_bits(fp16_bits_to_float32(w[start + r, i]))
            rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
            out[r, i] = np.uint16((bits + rounding) >> np.uint32(16))


def _ceil(n: int, unit: int) -> int:
    return -(-n // unit) * unit


FP16_BLOCK_ROWS = 512  # fp16 rows rounded to bf16 at a time (4 MiB of bf16 at I = 4096)


def project_bf16(x: np.ndarray, w_bits: np.ndarray, fp16: bool) -> np.ndarray:
    """x [T, I] float32, w_bits [O, I] uint16 (bf16, or fp16 when fp16) -> [T, O] float32
    = bf16(x) @ bf16(W).T summed in float32. Ragged T, O and I are padded with zeros."""
    T, I = x.shape
    O = w_bits.shape[0]
    columns = _ceil(I, STEP)
    x_bits = np.zeros((_ceil(T, TOKENS), columns), dtype=np.uint16)
    x_bits[:T, :I] = float32_to_bfloat16(x)
    out = np.empty((len(x_bits), _ceil(O, ROWS)), dtype=np.float32)
    block = FP16_BLOCK_ROWS if fp16 else _ceil(O, ROWS)
    for start in range(0, O, block):
        stop = min(start + block, O)
        rows = _bf16_rows(w_bits, start, stop, fp16, columns)
        rows_bf16_compute(x_bits, rows, out[:, start : start + len(rows)])
    return np.ascontiguousarray(out[:T, :O])


def _bf16_rows(w_bits, start, stop, fp16, columns):
    """Rows [start, stop) of W as bf16 bits, padded with zero rows and columns to whole tiles."""
    n, I = stop - start, w_bits.shape[1]
    if not fp16 and n % ROWS == 0 and columns == I:
        return w_bits[start:stop]
    padded = np.zeros((_ceil(n, ROWS), columns), dtype=np.uint16)
    if fp16:
        fp16_to_bf16_rows(w_bits, start, padded[:n, :I])
    else:
        padded[:n, :I] = w_bits[start:stop]
    return padded
