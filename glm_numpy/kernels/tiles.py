"""Register tiles for 16-bit weights: ROWS weight rows x TOKENS rows of x per pass, in LLVM IR.

    x [T, I] float32, W [O, I] fp16 or bf16 bits -> out [T, O] = x @ W.T, float32-exact products

Each step of the loop loads 16 columns of 4 weight rows (widened to float32 in registers:
``vcvtph2ps`` for fp16, a 16-bit shift for bf16) and of 6 rows of x, and issues 24 fused
multiply-adds into 24 accumulators of 16 lanes, so every weight value loaded serves 6 tokens and
every x value 4 weight rows. numba's own loops stop at 256-bit vectors and a 2 x 4 tile; this one
uses the full 512-bit registers. The lanes are added once per tile at the end.

``tile_loop`` builds the loop for any element type: glm_numpy.kernels.bf16dot uses it with
``vdpbf16ps`` for compute="bf16". Ragged T, O and I are padded with zeros by ``project16``.

Editing this file: numba's on-disk cache of bf16dot's kernels is keyed on bf16dot.py alone, so
touch it too (or delete its __pycache__), or its cached kernels keep the old tile shape; the same
for attention.py, whose decode kernel widens 16-bit keys with _load_fp16 / _load_bf16.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# A tile: 4 weight rows x 6 rows of x, 24 accumulators (+ 4 weight vectors and an x vector: 29
# of the 32 registers). Measured on [13680, 4096] fp16 at 24 / 120 rows: 4 x 4 87-106 GFLOP/s,
# 4 x 6 103-128, 3 x 8 80-98, 2 x 12 28 (spills).
ROWS, TOKENS = 4, 6
STEP = 16  # columns per step (16 float32 lanes)
# Rows of x per block (kept in L2 while every weight row streams past them once).
TOKEN_BLOCK_BYTES = 512 * 1024

_i16, _i32, _i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_floats = ir.VectorType(ir.FloatType(), 16)


def _lane_sum(builder: ir.IRBuilder, vector) -> ir.Value:
    total = builder.extract_element(vector, ir.Constant(_i32, 0))
    for lane in range(1, 16):
        total = builder.fadd(total, builder.extract_element(vector, ir.Constant(_i32, lane)))
    return total


def tile_loop(builder, args, w_step_bytes, x_step_bytes, load_w, load_x, multiply_add):
    """The tile kernel's body. args = (w, x, steps, w_stride, x_stride, out, out_stride): the
    addresses of weight row 0 and x row 0 (rows w_stride / x_stride bytes apart), the number of
    steps, and where to store: token t's result for row r at out + t * out_stride + 4 r.
    load_w / load_x(builder, address) -> an operand; multiply_add(builder, acc, x, w) -> acc."""
    w, x, steps, w_stride, x_stride, out, out_stride = args
    rows = [builder.add(w, builder.mul(ir.Constant(_i64, r), w_stride)) for r in range(ROWS)]
    xs = [builder.add(x, builder.mul(ir.Constant(_i64, t), x_stride)) for t in range(TOKENS)]
    zero = ir.Constant(_floats, None)
    entry = builder.block
    loop = builder.append_basic_block("tile.loop")
    done = builder.append_basic_block("tile.done")
    builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(_i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_i64)
    accs = [builder.phi(_floats) for _ in range(ROWS * TOKENS)]
    w_offset = builder.mul(k, ir.Constant(_i64, w_step_bytes))
    x_offset = builder.mul(k, ir.Constant(_i64, x_step_bytes))
    weights = [load_w(builder, builder.add(row, w_offset)) for row in rows]
    activations = [load_x(builder, builder.add(row, x_offset)) for row in xs]
    new = [
        multiply_add(builder, accs[r * TOKENS + t], activations[t], weights[r])
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


def _load(builder, address, vector_type, align):
    return builder.load(builder.inttoptr(address, vector_type.as_pointer()), align=align)


def _load_floats(builder, address):
    return _load(builder, address, _floats, 4)


def _load_fp16(builder, address):
    """16 fp16 values -> 16 float32 lanes (vcvtph2ps)."""
    halves = _load(builder, address, ir.VectorType(ir.HalfType(), 16), 2)
    return builder.fpext(halves, _floats)


def _load_bf16(builder, address):
    """16 bf16 values -> 16 float32 lanes: each bit pattern becomes a float32's top half."""
    bits = _load(builder, address, ir.VectorType(_i16, 16), 2)
    wide = builder.zext(bits, ir.VectorType(_i32, 16))
    shifted = builder.shl(wide, ir.Constant(ir.VectorType(_i32, 16), [ir.Constant(_i32, 16)] * 16))
    return builder.bitcast(shifted, _floats)


def _fma(builder, acc, x, w):
    module = builder.module
    name = "llvm.fma.v16f32"
    function = module.globals.get(name) or ir.Function(
        module, ir.FunctionType(_floats, [_floats] * 3), name
    )
    return builder.call(function, [x, w, acc])


_SIGNATURE = types.void(*[types.intp] * 7)


@intrinsic
def dot_tile_fp16(typingctx, w, x, steps, w_stride, x_stride, out, out_stride):
    """fp16 weight rows x float32 rows of x (see tile_loop); steps = I / 16."""

    def codegen(context, builder, sig, args):
        tile_loop(builder, args, 2 * STEP, 4 * STEP, _load_fp16, _load_floats, _fma)
        return context.get_dummy_value()

    return _SIGNATURE, codegen


@intrinsic
def dot_tile_bf16(typingctx, w, x, steps, w_stride, x_stride, out, out_stride):
    """bf16 weight rows x float32 rows of x (see tile_loop); steps = I / 16."""

    def codegen(context, builder, sig, args):
        tile_loop(builder, args, 2 * STEP, 4 * STEP, _load_bf16, _load_floats, _fma)
        return context.get_dummy_value()

    return _SIGNATURE, codegen


@njit(inline="always")
def tile_rows(x, w, out, tile, step):
    """The parallel loop over tiles (x [T, I], w [O, I], out [T, O]; T and O whole tiles, I
    whole steps of ``step`` columns): blocks of rows of x (TOKEN_BLOCK_BYTES, whole tiles), the
    weight rows split between the threads a tile at a time."""
    T, I = x.shape
    O = w.shape[0]
    steps = I // step
    row_bytes = x.strides[0]
    w_stride, x_stride, out_stride = w.strides[0], x.strides[0], out.strides[0]
    block = max(TOKENS, min(T, TOKEN_BLOCK_BYTES // row_bytes) // TOKENS * TOKENS)
    for first in range(0, T, block):
        for quad in prange(O // ROWS):
            o = quad * ROWS
            for t in range(first, min(first + block, T), TOKENS):
                tile(
                    w[o].ctypes.data, x[t].ctypes.data, steps, w_stride, x_stride,
                    out[t, o:].ctypes.data, out_stride,
                )  # fmt: skip


@njit(parallel=True, cache=True)
def rows_fp16(x, w, out):
    """x [T, I] float32, w [O, I] uint16 (fp16 bits) -> out [T, O] = x @ W.T; T and O whole
    tiles, I a multiple of STEP."""
    tile_rows(x, w, out, dot_tile_fp16, STEP)


@njit(parallel=True, cache=True)
def rows_bf16(x, w, out):
    """rows_fp16 for bf16 bits."""
    tile_rows(x, w, out, dot_tile_bf16, STEP)


def ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def project16(x: np.ndarray, bits: np.ndarray, fp16: bool) -> np.ndarray:
    """x [T, I] float32, bits [O, I] uint16 (fp16 when fp16, else bf16) -> [T, O] = x @ W.T.
    Ragged T, I are padded with zeros; the last O % ROWS rows go through a zero-padded copy."""
    T, I = x.shape
    O = bits.shape[0]
    columns = ceil_to(I, STEP)
    padded_x = np.zeros((ceil_to(T, TOKENS), columns), dtype=np.float32)
    padded_x[:T, :I] = x
    if columns != I:  # rare (not in ChatGLM2's sizes): a padded copy of the weight
        bits = _read_only(np.pad(bits, ((0, 0), (0, columns - I))))
    kernel = rows_fp16 if fp16 else rows_bf16
    whole = O // ROWS * ROWS
    out = np.empty((len(padded_x), whole), dtype=np.float32)  # [T padded, whole tiles of O]
    if whole:
        kernel(padded_x, bits[:whole], out)
    if whole == O:
        return out[:T]
    tail = np.zeros((ROWS, columns), dtype=np.uint16)
    tail[: O - whole] = bits[whole:]
    tail_out = np.empty((len(padded_x), ROWS), dtype=np.float32)
    kernel(padded_x, _read_only(tail), tail_out)
    return np.concatenate([out[:T], tail_out[:T, : O - whole]], axis=1)


def _read_only(array: np.ndarray) -> np.ndarray:
    """As the dispatcher's weight views (one numba specialisation for all weights)."""
    array.flags.writeable = False
    return array
