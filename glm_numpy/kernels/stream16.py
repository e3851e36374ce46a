"""Decode over 16-bit weights in LLVM IR: weight rows against one row of x, 512 bits wide.

    w rows [I] fp16 or bf16 bits, x [I] float32 -> each row · x over its first 32 * lines
    columns (float32)

matvec_fp16 / matvec_bf16 (glm_numpy.kernels.matvec) call ``dot_row_*`` once per output row,
the *_pairs kernels ``dot_rows_*`` once per block of ROWS rows, and add the last I % 32 columns
themselves. Each step takes one 64-byte cache line of each row (32 weights): two 16-lane
widenings (``vcvtph2ps`` for fp16, a 16-bit shift for bf16, as in glm_numpy.kernels.tiles) and
two fused multiply-adds into two accumulators per row, whose lanes are added once at the end in
a tree of halvings. numba's own loop over the same row (the previous matvec) stopped at 256-bit
vectors and had no prefetch.

Each step also prefetches the weights ahead of the loads: 8 KiB ahead of a lone row, 2 KiB ahead
of each row of a block of 4 (about 8 KiB in flight per thread either way). The loader
memory-maps the checkpoint, so the weights sit in 4 KiB page-cache pages, and the hardware
prefetchers stop at every page boundary (a 4096-column fp16 row spans two pages).

Rows of 4096 columns go one at a time: each thread then reads a single sequential stream (its
contiguous half of the rows), and blocks of 2 or 4 rows were slower ([4608, 4096], weights
memory-mapped, GB/s: one row 30-32, blocks of 2 25, of 4 27, the numba loop 18). Rows of 13696
columns (the MLP's down projection: x is 54 KiB, more than L1) go 4 at a time so each x load
serves 4 rows: [4096, 13696] 4 rows 26-30, 2 rows 24, one row 22-25, numba pairs 20-21.

Measured, matvec before -> after (GB/s of weights; Zen 5, 2 threads, one process alternating
the two kernels, median of 7 rounds, two runs; a busy VM whose 2 GiB probe read 24-38 GB/s;
"mmap" = weights memory-mapped from the fp16 checkpoint file as the loader holds them, "array"
= numpy arrays):

                  qkv            dense          h_to_4h        4h_to_h        lm_head
                  [4608, 4096]   [4096, 4096]   [27392, 4096]  [4096, 13696]  [65024, 4096]
    fp16 mmap     30-31 -> 31-38 29 -> 31-34    29-31 -> 30-33 12-21 -> 19-28 19-30 -> 19-31
    fp16 array    34 -> 40       30-32 -> 36-37 33 -> 36-38    23 -> 30-32    21-33 -> 20-32
    bf16 mmap     25-32 -> 29-37 26-33 -> 27-35 20-27 -> 20-29 12-18 -> 16-26 16-28 -> 18-27
    bf16 array    25-33 -> 30-37 28-34 -> 31-38 20-28 -> 24-32 17-20 -> 15-28 17-32 -> 18-33

that is x1.0-1.2 on the 4096-column shapes but the output layer (x0.96-1.07), x1.3-1.7 on the
down projection (one bf16 array run x0.87).

A full-size fp16 decode step (6b-safetensors, 16-token prompt, median of steps 1-5 per process,
before and after alternated in one lock hold, three holds), ms: 844 / 842 -> 722 / 622,
505 / 521 -> 478 / 403, 498 / 495 -> 404 / 396. The projections are ~97 % of a step; the VM's
slow and fast regimes show in the first hold.

Editing this file: numba's on-disk cache of matvec's kernels is keyed on matvec.py alone, so
touch it too (or delete its __pycache__), or the cached kernels keep the old code.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

ROWS = 4  # rows per block for long rows (see the module docstring)
LINE = 32  # columns per step: one 64-byte cache line of 16-bit weights
# Weights prefetched ahead of the loads, per thread: 8 KiB (two pages) ahead of a lone row, 2 KiB
# ahead of each row of a block of 4.
PREFETCH_BYTES = 8192

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_floats = ir.VectorType(ir.FloatType(), 16)


def _function(builder, name, return_type, argument_types):
    module = builder.module
    return module.globals.get(name) or ir.Function(
        module, ir.FunctionType(return_type, argument_types), name
    )


def _load(builder, address, vector_type, align):
    return builder.load(builder.inttoptr(address, vector_type.as_pointer()), align=align)


def _load_fp16(builder, address):
    """16 fp16 values -> 16 float32 lanes (vcvtph2ps)."""
    halves = _load(builder, address, ir.VectorType(ir.HalfType(), 16), 2)
    return builder.fpext(halves, _floats)


def _load_bf16(builder, address):
    """16 bf16 values -> 16 float32 lanes: each bit pattern becomes a float32's top half."""
    bits = _load(builder, address, ir.VectorType(_i16, 16), 2)
    wide = builder.zext(bits, ir.VectorType(_i32, 16))
    sixteen = ir.Constant(ir.VectorType(_i32, 16), [ir.Constant(_i32, 16)] * 16)
    return builder.bitcast(builder.shl(wide, sixteen), _floats)


def _fma(builder, acc, x, w):
    function = _function(builder, "llvm.fma.v16f32", _floats, [_floats] * 3)
    return builder.call(function, [x, w, acc])


def _prefetch(builder, address):
    """A read prefetch into all cache levels (llvm.prefetch: read, locality 3, data)."""
    pointer_type = _i8.as_pointer()
    function = _function(
        builder, "llvm.prefetch.p0i8", ir.VoidType(), [pointer_type, _i32, _i32, _i32]
    )
    flags = [ir.Constant(_i32, value) for value in (0, 3, 1)]
    builder.call(function, [builder.inttoptr(address, pointer_type), *flags])


def _lane_sum(builder, vector):
    """16 lanes -> their sum, halving the vector each time (4 dependent adds, not 15)."""
    width = 16
    while width > 1:
        width //= 2
        halves = [
            builder.shuffle_vector(
                vector, vector, ir.Constant(ir.VectorType(_i32, width), list(range(s, s + width)))
            )
            for s in (0, width)
        ]
        vector = builder.fadd(*halves)
    return builder.extract_element(vector, ir.Constant(_i32, 0))


def rows_loop(builder, w, x, lines, w_stride, rows, load_w):
    """rows weight rows from address w (w_stride bytes apart) . x (address), over lines LINE
    column steps -> a float32 dot product per row. Each x vector loaded serves every row."""
    starts = [builder.add(w, builder.mul(ir.Constant(_i64, r), w_stride)) for r in range(rows)]
    zero = ir.Constant(_floats, None)
    entry = builder.block
    loop = builder.append_basic_block("rows.loop")
    done = builder.append_basic_block("rows.done")
    builder.cbranch(builder.icmp_signed(">", lines, ir.Constant(_i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_i64)
    accs = [builder.phi(_floats) for _ in range(2 * rows)]  # two per row: its line's halves
    w_offset = builder.mul(k, ir.Constant(_i64, 2 * LINE))
    x_line = builder.add(x, builder.mul(k, ir.Constant(_i64, 4 * LINE)))
    xs = [
        _load(builder, builder.add(x_line, ir.Constant(_i64, 64 * h)), _floats, 4) for h in (0, 1)
    ]
    new = []
    for r, start in enumerate(starts):
        w_line = builder.add(start, w_offset)
        _prefetch(builder, builder.add(w_line, ir.Constant(_i64, PREFETCH_BYTES // rows)))
        for h in (0, 1):
            weights = load_w(builder, builder.add(w_line, ir.Constant(_i64, 32 * h)))
            new.append(_fma(builder, accs[2 * r + h], xs[h], weights))
    next_k = builder.add(k, ir.Constant(_i64, 1))
    k.add_incoming(ir.Constant(_i64, 0), entry)
    k.add_incoming(next_k, loop)
    for acc, value in zip(accs, new):
        acc.add_incoming(zero, entry)
        acc.add_incoming(value, loop)
    builder.cbranch(builder.icmp_signed("<", next_k, lines), loop, done)
    builder.position_at_end(done)
    finals = [builder.phi(_floats) for _ in new]  # all phis first, as LLVM requires
    for final, value in zip(finals, new):
        final.add_incoming(zero, entry)
        final.add_incoming(value, loop)
    return [_lane_sum(builder, builder.fadd(finals[2 * r], finals[2 * r + 1])) for r in range(rows)]


def _one_row(load_w):
    def codegen(context, builder, sig, args):
        w, x, lines = args
        (dot,) = rows_loop(builder, w, x, lines, ir.Constant(_i64, 0), 1, load_w)
        return dot

    return codegen


def _row_block(load_w):
    def codegen(context, builder, sig, args):
        w, x, lines, w_stride, out = args
        for r, dot in enumerate(rows_loop(builder, w, x, lines, w_stride, ROWS, load_w)):
            address = builder.add(out, ir.Constant(_i64, 4 * r))
            builder.store(dot, builder.inttoptr(address, ir.FloatType().as_pointer()))
        return context.get_dummy_value()

    return codegen


_ROW = types.float32(types.intp, types.intp, types.intp)
_BLOCK = types.void(*[types.intp] * 5)


@intrinsic
def dot_row_fp16(typingctx, w, x, lines):
    """(address of an fp16 row, address of float32 x, lines) -> their dot product over the
    first LINE * lines columns."""
    return _ROW, _one_row(_load_fp16)


@intrinsic
def dot_row_bf16(typingctx, w, x, lines):
    """dot_row_fp16 for a bf16 row."""
    return _ROW, _one_row(_load_bf16)


@intrinsic
def dot_rows_fp16(typingctx, w, x, lines, w_stride, out):
    """ROWS fp16 rows (w_stride bytes apart) . x, stored as ROWS float32 at address out."""
    return _BLOCK, _row_block(_load_fp16)


@intrinsic
def dot_rows_bf16(typingctx, w, x, lines, w_stride, out):
    """dot_rows_fp16 for bf16 rows."""
    return _BLOCK, _row_block(_load_bf16)
