"""bfloat16 products with AVX512-BF16 (``vdpbf16ps``): the opt-in ``compute="bf16"`` mode.

    x [T, I] float32, W [O, I] 16-bit -> out [T, O] ≈ bf16(x) @ bf16(W).T, summed in float32

This is what torch does for a bf16 model on a CPU: the activations are rounded to bfloat16 (8
significant bits) and each ``vdpbf16ps`` multiplies 32 bf16 pairs and adds neighbouring products
into 16 float32 sums: 32 multiply-adds per instruction where float32 FMA does 16, and half the
bytes of x to load. bf16 weights are used as stored; fp16 weights are rounded to bf16 a block of
rows at a time (they lose 3 of their 11 significant bits). docs/numerics.md gives the error
against float32, measured.

The tile kernel (an LLVM loop written with llvmlite, like glm_numpy.kernels.intdot) multiplies
ROWS weight rows by TOKENS rows of x: each step loads 4 + 4 vectors of 32 bf16 values and issues
16 ``vdpbf16ps`` into 16 accumulators held in registers. Columns come in steps of 32, so I must
be a multiple of 32 (the dispatcher falls back to float32 otherwise).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from glm_numpy.dtypes import float32_to_bfloat16
from glm_numpy.kernels.bits import fp16_bits_to_float32

HAS_AVX512_BF16 = "+avx512bf16" in set(llvm.get_host_cpu_features().flatten().split(","))
ROWS = TOKENS = 4  # a tile: 4 weight rows x 4 rows of x, 16 accumulators
STEP = 32  # bf16 values per 64-byte vector
# Rows of x per block (kept in L2 while the weight rows stream past): 64 x 8 KiB at I = 4096.
TOKEN_BLOCK_BYTES = 512 * 1024

_i32, _i64 = ir.IntType(32), ir.IntType(64)
_words = ir.VectorType(_i32, 16)  # 32 bf16 values as the instruction's integer view
_floats = ir.VectorType(ir.FloatType(), 16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it)."""

    def _to_string(self) -> str:
        return "bfloat"


_bf16_pairs = ir.VectorType(_BFloat(), 32)


def _dpbf16ps(builder: ir.IRBuilder, acc, a, b) -> ir.Value:
    """acc [16 x float] + a[2i] * b[2i] + a[2i+1] * b[2i+1] in lane i (products exact)."""
    module = builder.module
    name = "llvm.x86.avx512bf16.dpbf16ps.512"
    function = module.globals.get(name) or ir.Function(
        module, ir.FunctionType(_floats, [_floats, _bf16_pairs, _bf16_pairs]), name
    )
    return builder.call(
        function, [acc, builder.bitcast(a, _bf16_pairs), builder.bitcast(b, _bf16_pairs)]
    )


def _lane_sum(builder: ir.IRBuilder, vector) -> ir.Value:
    total = builder.extract_element(vector, ir.Constant(_i32, 0))
    for lane in range(1, 16):
        total = builder.fadd(total, builder.extract_element(vector, ir.Constant(_i32, lane)))
    return total


@intrinsic
def dot_bf16_tile(typingctx, w, x, steps, w_stride, x_stride, out, out_stride):
    """Addresses: w (ROWS rows of bf16 bits, w_stride bytes apart), x (TOKENS rows of bf16 bits,
    x_stride bytes apart), out (float32; token t's results at out + t * out_stride, row r's at
    + 4 r); steps = I / 32. Stores out[t, r] = Σ_i x[t, i] w[r, i]."""

    def codegen(context, builder, sig, args):
        w, x, steps, w_stride, x_stride, out, out_stride = args
        rows = [builder.add(w, builder.mul(ir.Constant(_i64, r), w_stride)) for r in range(ROWS)]
        xs = [builder.add(x, builder.mul(ir.Constant(_i64, t), x_stride)) for t in range(TOKENS)]
        zero = ir.Constant(_floats, None)
        entry = builder.block
        loop = builder.append_basic_block("bf16.loop")
        done = builder.append_basic_block("bf16.done")
        builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(_i64, 0)), loop, done)
        builder.position_at_end(loop)
        k = builder.phi(_i64)
        accs = [builder.phi(_floats) for _ in range(ROWS * TOKENS)]
        offset = builder.mul(k, ir.Constant(_i64, 2 * STEP))

        def load(address):
            pointer = builder.inttoptr(builder.add(address, offset), _words.as_pointer())
            return builder.load(pointer, align=2)

        weights = [load(row) for row in rows]
        activations = [load(row) for row in xs]
        new = [
            _dpbf16ps(builder, accs[r * TOKENS + t], activations[t], weights[r])
            for r in range(ROWS)
            for t in range(TOKENS)
        ]
        next_k = builder.add(k, ir.Constant(_i64, 1))
        k.add_incoming(ir.Constant(_i64, 0), entry)
        k.add_incoming(next_k, loop)
        for acc, value in zip(accs, new):
            acc.add_incoming(zero, entry)
            acc.add_incoming(value, loop)
        builder.cbranch(builder.icmp_signed("<", next_k, steps), loop, done)
        builder.position_at_end(done)
        finals = [builder.phi(_floats) for _ in new]  # all phis first, as LLVM requires
        for final, value in zip(finals, new):
            final.add_incoming(zero, entry)
            final.add_incoming(value, loop)
        for r in range(ROWS):
            for t in range(TOKENS):
                address = builder.add(
                    builder.add(out, builder.mul(ir.Constant(_i64, t), out_stride)),
                    ir.Constant(_i64, 4 * r),
                )
                pointer = builder.inttoptr(address, ir.FloatType().as_pointer())
                builder.store(_lane_sum(builder, finals[r * TOKENS + t]), pointer)
        return context.get_dummy_value()

    return types.void(*[types.intp] * 7), codegen


@njit(parallel=True, cache=True)
def rows_bf16_compute(x_bits, w_bits, out):
    """x_bits [T, I] uint16 (bf16, T a multiple of TOKENS), w_bits [O, I] uint16 (bf16; O a
    multiple of ROWS), out [T, O] float32 (rows may be strided) -> out = x @ W.T."""
    T, I = x_bits.shape
    O = w_bits.shape[0]
    steps = I // STEP
    w_stride, x_stride, out_stride = w_bits.strides[0], x_bits.strides[0], out.strides[0]
    block = max(TOKENS, min(T, TOKEN_BLOCK_BYTES // (2 * I)) // TOKENS * TOKENS)
    for first in range(0, T, block):
        for quad in prange(O // ROWS):
            o = quad * ROWS
            w = w_bits[o].ctypes.data
            for t in range(first, min(first + block, T), TOKENS):
                dot_bf16_tile(
                    w, x_bits[t].ctypes.data, steps, w_stride, x_stride, out[t, o:].ctypes.data,
                    out_stride,
                )  # fmt: skip


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
