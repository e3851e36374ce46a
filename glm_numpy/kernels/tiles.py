"""Register tiles for 16-bit weights: outer products over packed panels, in LLVM IR.

    x [T, I] float32, W [O, I] fp16 or bf16 bits -> out [T, O] = x @ W.T, float32-exact products

The kernel keeps C.T in registers: 24 accumulators of 16 lanes, each holding 16 tokens' sums for
one weight row (tiles of 4 token groups x 6 weight rows, 2 x 12 or 1 x 24). Each step (one
column k) loads the tokens' x[:, k] as whole vectors and broadcasts each weight row's W[o, k]
straight from memory into its multiply-adds (``vfmadd231ps zmm, zmm, m32{1to16}``): no
conversion, shuffle or horizontal sum in the loop, so it runs at the FMA units' rate (one core,
data in L1: ~250 GFLOP/s, about 2 FMAs per cycle).

For that, both operands are packed, as BLAS does:

- x, once per call, into token groups of 16 lanes per column and blocks of PANEL_STEPS columns
  (``pack_x``): [column blocks, T / 16, PANEL_STEPS, 16];
- W, a block of rows at a time into a small buffer per block, widened to float32 on the way
  (``vcvtph2ps`` for fp16, a 16-bit shift for bf16): the stored weights stay 16-bit and
  memory-mapped. Many tokens (``tiled_rows``): BLOCK_ROWS rows x PANEL_STEPS columns (48 KiB,
  L1-L2), swept by every token tile before the next columns; the next columns are prefetched while
  this block is packed. At most 16 tokens (``streamed_rows``): STREAM_ROWS rows x PANEL_STEPS
  columns (12 KiB, in L1), multiplied as soon as packed, and while a block of rows is multiplied
  the kernel prefetches the next block's rows into L2 (one cache line per step), so streaming W
  from memory overlaps the arithmetic. (Packing all of a block's columns first, 384 KiB in L2,
  was slower: 221-232 GFLOP/s at 16 tokens against 281-299.)

A block's partial sums stay in its C.T buffer [rows, tokens]; the last step writes
them to out [T, O]. Ragged T is padded with zero tokens (whole groups of 16), ragged O and I are
handled by the packing (rows past O are never written out, columns past I never read).

Measured (linear, [13696, 4096] fp16, both cores, 16 / 128 / 512 tokens, GFLOP/s, best of 7,
two rounds in one lock hold on a shared, noisy machine): 4 x 6 tiles of horizontal dot products
over unpacked rows 150-214 / 220-228 / 221-229, this kernel 303 (148 in a disturbed round) / 340
/ 367-370. One core's FMA peak here is ~250 (the kernel alone in L1), so ~500 for both.

``panel_kernel`` builds the kernel for any 4-byte step: glm_numpy.kernels.bf16dot uses it with
``vdpbf16ps`` for compute="bf16" (a step is then a pair of bf16 columns).

Editing this file: numba's on-disk cache of bf16dot's kernels is keyed on bf16dot.py alone, so
touch it too (or delete its __pycache__), or its cached kernels keep the old code. After a
change of a constant here, delete both modules' caches (touching was seen not to be enough).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from glm_numpy.kernels.bits import bf16_bits_to_float32, fp16_bits_to_float32

LANES = 16  # tokens per vector (16 float32 lanes)
# Steps (columns, or bf16 column pairs) per packed block: a 24-row panel is 12 KiB and the x of
# a 4-group tile 32 KiB, both in L1. compute bf16 at 128 tokens: 642-710 GFLOP/s against
# 559-672 with 256 steps; float32 alike.
PANEL_STEPS = 128
BLOCK_ROWS = 96  # weight rows packed at a time for many tokens (a multiple of 6, 12 and 24)
STREAM_ROWS = 24  # weight rows per block for at most 16 tokens (one 1 x 24 tile)
STREAM_CHUNK = 4  # blocks a thread takes at a time (the next block, prefetched, is usually its own)
# Tiles as (token groups, weight rows): 24 accumulators, the token vectors and nothing else.
# Measured on [13696, 4096] fp16 at 128 / 512 tokens: 4 x 6 422 / 418 GFLOP/s, 2 x 12 419 / 400,
# 3 x 8 416 / 411; blocks of 192 rows no faster.
WIDE, MIDDLE, NARROW = (4, 6), (2, 12), (1, 24)

_i32, _i64 = ir.IntType(32), ir.IntType(64)
_floats = ir.VectorType(ir.FloatType(), LANES)


def _pointer(builder, address, value_type):
    return builder.inttoptr(address, value_type.as_pointer())


def _prefetch(builder, address):
    """Bring the line at address into L2 (``prefetcht1``): it is needed a block from now."""
    i8p = ir.IntType(8).as_pointer()
    name = "llvm.prefetch.p0i8"
    function = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, _i32, _i32, _i32]), name
    )
    read, to_l2, data = (ir.Constant(_i32, v) for v in (0, 2, 1))
    builder.call(function, [builder.inttoptr(address, i8p), read, to_l2, data])


def panel_loop(builder, args, vectors, rows, broadcast, multiply_add, prefetching):
    """The kernel's body. args = (w, x, steps, c, c_stride[, ahead, ahead_step]): the packed
    panel (weight row r's step k at w + 4 (r PANEL_STEPS + k)), the packed tokens (group v's
    step k at x + 64 (v PANEL_STEPS + k)), the number of steps, and C.T (weight row r's tokens
    at c + r c_stride + 64 v, loaded, added to and stored back). When prefetching, step k also
    prefetches ahead + k ahead_step.
    broadcast(builder, address) -> one weight operand for all lanes;
    multiply_add(builder, acc, x, w) -> acc."""
    w, x, steps, c, c_stride = args[:5]
    c_rows = [builder.add(c, builder.mul(ir.Constant(_i64, r), c_stride)) for r in range(rows)]
    c_pointers = [
        _pointer(builder, builder.add(c_rows[r], ir.Constant(_i64, 64 * v)), _floats)
        for r in range(rows)
        for v in range(vectors)
    ]
    initial = [builder.load(pointer, align=4) for pointer in c_pointers]
    entry = builder.block
    loop = builder.append_basic_block("panel.loop")
    done = builder.append_basic_block("panel.done")
    builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(_i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(_i64)
    accs = [builder.phi(_floats) for _ in initial]
    if prefetching:
        ahead, ahead_step = args[5:]
        _prefetch(builder, builder.add(ahead, builder.mul(k, ahead_step)))
    x_at = builder.add(x, builder.mul(k, ir.Constant(_i64, 64)))
    w_at = builder.add(w, builder.mul(k, ir.Constant(_i64, 4)))
    tokens = [
        builder.load(
            _pointer(builder, builder.add(x_at, ir.Constant(_i64, 64 * PANEL_STEPS * v)), _floats),
            align=4,
        )
        for v in range(vectors)
    ]
    new = []
    for r in range(rows):
        weight = broadcast(builder, builder.add(w_at, ir.Constant(_i64, 4 * PANEL_STEPS * r)))
        new += [
            multiply_add(builder, accs[r * vectors + v], tokens[v], weight) for v in range(vectors)
        ]
    next_k = builder.add(k, ir.Constant(_i64, 1))
    k.add_incoming(ir.Constant(_i64, 0), entry)
    k.add_incoming(next_k, loop)
    for acc, start, value in zip(accs, initial, new):
        acc.add_incoming(start, entry)
        acc.add_incoming(value, loop)
    builder.cbranch(builder.icmp_signed("<", next_k, steps), loop, done)
    builder.position_at_end(done)
    finals = [builder.phi(_floats) for _ in new]  # all phis first, as LLVM requires
    for final, start, value in zip(finals, initial, new):
        final.add_incoming(start, entry)
        final.add_incoming(value, loop)
    for final, pointer in zip(finals, c_pointers):
        builder.store(final, pointer, align=4)


def panel_kernel(shape, broadcast, multiply_add, prefetching=False):
    """An intrinsic (w, x, steps, c, c_stride[, ahead, ahead_step]) -> None running
    ``panel_loop`` on a tile of shape (token groups, weight rows)."""
    vectors, rows = shape
    arguments = 7 if prefetching else 5

    def codegen(context, builder, signature, args):
        panel_loop(builder, args, vectors, rows, broadcast, multiply_add, prefetching)
        return context.get_dummy_value()

    def typer(typingctx, *args):
        return types.void(*[types.intp] * arguments), codegen

    # numba's intrinsic reads the argument names from the signature: spell them out.
    if prefetching:

        def kernel(typingctx, w, x, steps, c, c_stride, ahead, ahead_step):
            return typer(typingctx)
    else:

        def kernel(typingctx, w, x, steps, c, c_stride):
            return typer(typingctx)

    return intrinsic(kernel)


def _splat(builder, scalar, vector_type):
    single = builder.insert_element(ir.Constant(vector_type, None), scalar, ir.Constant(_i32, 0))
    zeros = ir.Constant(ir.VectorType(_i32, LANES), [ir.Constant(_i32, 0)] * LANES)
    return builder.shuffle_vector(single, ir.Constant(vector_type, None), zeros)


def broadcast_float(builder, address):
    """The float32 at address in every lane (folded into the FMA as m32{1to16})."""
    value = builder.load(_pointer(builder, address, ir.FloatType()), align=4)
    return _splat(builder, value, _floats)


def _fma(builder, acc, x, w):
    name = "llvm.fma.v16f32"
    function = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(_floats, [_floats] * 3), name
    )
    return builder.call(function, [x, w, acc])


_wide, _middle, _narrow = (panel_kernel(s, broadcast_float, _fma) for s in (WIDE, MIDDLE, NARROW))
_streaming = panel_kernel(NARROW, broadcast_float, _fma, prefetching=True)


@intrinsic
def prefetch(typingctx, address):
    """Bring the cache line at address (an integer) into L2."""

    def codegen(context, builder, signature, args):
        _prefetch(builder, args[0])
        return context.get_dummy_value()

    return types.void(types.intp), codegen


@njit(inline="always")
def _write_out(ct, out, first_row, rows):
    """out[t, first_row + r] = ct[r, t] for the real tokens and rows."""
    for t in range(out.shape[0]):
        for r in range(rows):
            out[t, first_row + r] = ct[r, t]


@njit(inline="always")
def tiled_rows(xp, w, n_steps, step_bytes, out, panel_like, sums_like, pack, wide, middle, narrow):
    """Many tokens. xp [blocks, G, PANEL_STEPS, 16 lanes] (``pack_x``), w [O, I] as stored
    (n_steps steps of step_bytes per row), out [T, O]. pack(w, row, first, steps, panel_row)
    packs steps steps of a row from step first. Each block of BLOCK_ROWS weight rows has its own
    scratch, shaped as panel_like [BLOCK_ROWS, PANEL_STEPS] and sums_like [BLOCK_ROWS, 16 G]
    (``scratch``; threads take blocks as ``run_blocks`` sets); every token tile sweeps a block's
    packed columns."""
    n_blocks, groups = xp.shape[0], xp.shape[1]
    O = w.shape[0]
    c_stride = sums_like.strides[0]
    blocks = (O + BLOCK_ROWS - 1) // BLOCK_ROWS
    for b in prange(blocks):
        panel, ct = np.empty_like(panel_like), np.empty_like(sums_like)  # this block's scratch
        first_row = b * BLOCK_ROWS
        rows = min(BLOCK_ROWS, O - first_row)
        ct[:] = 0
        for kb in range(n_blocks):
            first = kb * PANEL_STEPS
            steps = min(PANEL_STEPS, n_steps - first)
            ahead_bytes = min(PANEL_STEPS, n_steps - first - PANEL_STEPS) * step_bytes
            for r in range(rows):
                pack(w, first_row + r, first, steps, panel[r])
                next_columns = w[first_row + r].ctypes.data + (first + PANEL_STEPS) * step_bytes
                for line in range(0, ahead_bytes, 64):
                    prefetch(next_columns + line)
            g = 0
            while g < groups:
                x_at = xp[kb, g].ctypes.data
                if groups - g >= WIDE[0]:
                    for p in range(BLOCK_ROWS // WIDE[1]):
                        c = ct[p * WIDE[1], g * LANES :].ctypes.data
                        wide(panel[p * WIDE[1]].ctypes.data, x_at, steps, c, c_stride)
                    g += WIDE[0]
                elif groups - g >= MIDDLE[0]:
                    for p in range(BLOCK_ROWS // MIDDLE[1]):
                        c = ct[p * MIDDLE[1], g * LANES :].ctypes.data
                        middle(panel[p * MIDDLE[1]].ctypes.data, x_at, steps, c, c_stride)
                    g += MIDDLE[0]
                else:
                    for p in range(BLOCK_ROWS // NARROW[1]):
                        c = ct[p * NARROW[1], g * LANES :].ctypes.data
                        narrow(panel[p * NARROW[1]].ctypes.data, x_at, steps, c, c_stride)
                    g += NARROW[0]
        _write_out(ct, out, first_row, rows)


@njit(inline="always")
def streamed_rows(xp, w, n_steps, step_bytes, out, panel_like, sums_like, pack, streaming):
    """At most 16 tokens (one group): as tiled_rows, but blocks of STREAM_ROWS rows, each
    packed PANEL_STEPS columns at a time into a panel [STREAM_ROWS, PANEL_STEPS] (L1) and
    multiplied at once, sums [STREAM_ROWS, 16]; the kernel prefetches the next
    block's stored rows (contiguous in memory) into L2 while it multiplies this one."""
    n_blocks = xp.shape[0]
    O = w.shape[0]
    blocks = (O + STREAM_ROWS - 1) // STREAM_ROWS
    block_bytes = STREAM_ROWS * w.strides[0]
    ahead_step = -(-block_bytes // (n_blocks * PANEL_STEPS))  # bytes to prefetch per step
    for b in prange(blocks):
        panel, ct = np.empty_like(panel_like), np.empty_like(sums_like)  # this block's scratch
        first_row = b * STREAM_ROWS
        rows = min(STREAM_ROWS, O - first_row)
        ct[:] = 0
        ahead = w.ctypes.data + (b + 1) * block_bytes
        for kb in range(n_blocks):
            first = kb * PANEL_STEPS
            steps = min(PANEL_STEPS, n_steps - first)
            for r in range(rows):
                pack(w, first_row + r, first, steps, panel[r])
            streaming(
                panel.ctypes.data, xp[kb, 0].ctypes.data, steps, ct.ctypes.data,
                ct.strides[0], ahead + first * ahead_step, ahead_step,
            )  # fmt: skip
        _write_out(ct, out, first_row, rows)


@njit(inline="always")
def widen_fp16(w, row, first, steps, panel_row):
    """panel_row[:steps] = fp16 W[row, first : first + steps] as float32."""
    source = w[row, first : first + steps]
    for s in range(steps):
        panel_row[s] = fp16_bits_to_float32(source[s])


@njit(inline="always")
def widen_bf16(w, row, first, steps, panel_row):
    """panel_row[:steps] = bf16 W[row, first : first + steps] as float32."""
    source = w[row, first : first + steps]
    for s in range(steps):
        panel_row[s] = bf16_bits_to_float32(source[s])


@njit(parallel=True, cache=True)
def rows_fp16(xp, w, out, panel_like, sums_like):
    """x @ W.T for fp16 bits w [O, I] (see tiled_rows)."""
    tiled_rows(
        xp, w, w.shape[1], 2, out, panel_like, sums_like, widen_fp16, _wide, _middle, _narrow
    )


@njit(parallel=True, cache=True)
def rows_bf16(xp, w, out, panel_like, sums_like):
    """x @ W.T for bf16 bits w [O, I] (see tiled_rows)."""
    tiled_rows(
        xp, w, w.shape[1], 2, out, panel_like, sums_like, widen_bf16, _wide, _middle, _narrow
    )


@njit(parallel=True, cache=True)
def few_rows_fp16(xp, w, out, panel_like, sums_like):
    """x @ W.T for at most 16 tokens, fp16 bits w [O, I] (see streamed_rows)."""
    streamed_rows(xp, w, w.shape[1], 2, out, panel_like, sums_like, widen_fp16, _streaming)


@njit(parallel=True, cache=True)
def few_rows_bf16(xp, w, out, panel_like, sums_like):
    """x @ W.T for at most 16 tokens, bf16 bits w [O, I] (see streamed_rows)."""
    streamed_rows(xp, w, w.shape[1], 2, out, panel_like, sums_like, widen_bf16, _streaming)


def ceil_to(n: int, unit: int) -> int:
    return -(-n // unit) * unit


@njit(inline="always")
def pack_tokens(x, xp, steps, convert):
    """Fill xp [blocks, G, PANEL_STEPS, 16 lanes, ...] (zeros: the padding) from the tokens of
    x and its first steps steps, one (block, group) tile per iteration: convert(x, t, first,
    count, tile, j) writes token t's steps first .. first + count into lane j of tile."""
    T = x.shape[0]
    blocks, groups = xp.shape[0], xp.shape[1]
    for index in prange(blocks * groups):
        b, g = index // groups, index % groups
        first = b * PANEL_STEPS
        count = min(PANEL_STEPS, steps - first)
        for j in range(min(LANES, T - g * LANES)):
            convert(x, g * LANES + j, first, count, xp[b, g], j)


@njit(inline="always")
def _copy_floats(x, t, first, count, tile, j):
    source = x[t, first : first + count]
    for k in range(count):
        tile[k, j] = source[k]


@njit(parallel=True, cache=True)
def pack_floats(x, xp):
    """x [T, I] float32 -> xp [blocks, G, PANEL_STEPS, 16] (see pack_tokens)."""
    pack_tokens(x, xp, x.shape[1], _copy_floats)


def pack_x(x: np.ndarray) -> np.ndarray:
    """x [T, I] float32 -> [blocks, G, PANEL_STEPS, 16] zero-padded: block b, group g, step k,
    lane j holds x[16 g + j, PANEL_STEPS b + k]."""
    T, I = x.shape
    xp = np.zeros((-(-I // PANEL_STEPS), -(-T // LANES), PANEL_STEPS, LANES), dtype=np.float32)
    pack_floats(x, xp)
    return xp


def scratch(tokens: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The shapes of a block's scratch for tiled_rows / streamed_rows, as arrays to copy:
    (packed panel [rows, PANEL_STEPS] of dtype, C.T sums [rows, tokens padded] float32)."""
    groups = -(-tokens // LANES)
    rows = STREAM_ROWS if groups == 1 else BLOCK_ROWS
    return np.empty((rows, PANEL_STEPS), dtype=dtype), np.empty((rows, groups * LANES), np.float32)


def run_blocks(kernel, tokens: int, *args) -> None:
    """kernel(*args), its threads taking blocks of rows a few at a time as they finish the last
    (numba's default gives each a fixed half, and on this shared machine one core is often
    slowed by other work: [13696, 4096] at 512 tokens, fp16 326-354 -> 364-385 GFLOP/s)."""
    previous = numba.set_parallel_chunksize(STREAM_CHUNK if tokens <= LANES else 1)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(previous)


def project16(x: np.ndarray, bits: np.ndarray, fp16: bool) -> np.ndarray:
    """x [T, I] float32, bits [O, I] uint16 (fp16 when fp16, else bf16) -> [T, O] = x @ W.T."""
    T, I = x.shape
    out = np.empty((T, bits.shape[0]), dtype=np.float32)
    panel_like, sums_like = scratch(T, np.float32)
    if T <= LANES:
        kernel = few_rows_fp16 if fp16 else few_rows_bf16
    else:
        kernel = rows_fp16 if fp16 else rows_bf16
    run_blocks(kernel, T, pack_x(x), bits, out, panel_like, sums_like)
    return out
