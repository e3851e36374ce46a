"""Integer dot products for quantised weights: AVX2, and AVX-512 VNNI where the CPU has it.

Widening int8/int4 weights to float costs several instructions per weight, too many to keep up
with memory at 4 bits. So the decode kernels quantise the activation row too (int8, one scale
per block of 32 stored bytes, as llama.cpp does) and multiply integers. On AVX2 ``vpmaddubsw``
multiplies 32 unsigned bytes by 32 signed bytes and adds neighbouring pairs into 16-bit sums,
``vpmaddwd`` adds those into eight 32-bit sums. Each block's integer sum is turned into float32
and scaled by its activation scale and its group's weight scale.

With AVX-512 VNNI (``HAS_AVX512_VNNI``) one ``vpdpbusd`` does both steps, and each step takes
two blocks (64 bytes, one cache line) in 16 lanes: half the instructions per weight byte. A
group's odd last block goes through the same step with its upper 32 bytes zero. With both
threads the per-row int4 kernel waits on memory either way ([13696, 4096]: 49.1 GB/s on AVX2,
50.2 with VNNI); the halved instructions show where compute binds: one thread 34.2 -> 36.7
GB/s, groups of 128 about 3 % less time per 6B token.

numba cannot express these instructions, so each kernel is an LLVM loop written with llvmlite
(``numba.extending.intrinsic``), taking raw addresses from the caller:

    dot_int4_blocks(packed, x_even, x_odd, x_scale, w_scale, n_groups, group_blocks) -> float32
        sum over groups g of w_scale[g] * sum over its blocks b of
        x_scale[b] * sum_k u(packed[b, k]) · (x_even, x_odd)[b, k],
        u = both nibbles of byte ^ 0x88 = signed value + 8, in 0..15 (the caller subtracts 8·Σx)
    dot_int8_blocks(q, x, x_scale, w_scale, n_groups, group_blocks) -> float32
        the same with q[b] · x[b]; the signed q rides on x's sign (|q| · sign(x, q)), so the
        unsigned operand is |q| <= 128, and no 16-bit sum (AVX2) overflows.

Both name the AVX-512 VNNI kernel where the CPU has it and the AVX2 one (``*_avx2``) elsewhere;
the integer sums are exact either way, so the two differ only in float32 rounding.

The weight scales (float16 bits) are applied per group to 8- or 16-lane vectors, and the lanes
are added once per row: a horizontal sum per group would cost as much as the group's products.

Each step also asks the cache for the weight bytes ``PREFETCH_AHEAD`` further on. A row is
only a few KiB, and the hardware prefetcher alone left the loop waiting on memory: with the
software prefetch the int4 kernel read [13696, 4096] weights at ~15 GB/s instead of ~11-13.

Available only where the CPU has AVX2 (``HAS_AVX2``) and for float16 weight scales; elsewhere the
float kernels run.

Editing this file: numba's on-disk cache of the kernels in matvec.py and multirow.py is keyed
on those files alone, so touch them (or delete their __pycache__) or the old code keeps running.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_HOST_FEATURES = set(llvm.get_host_cpu_features().flatten().split(","))
HAS_AVX2 = "+avx2" in _HOST_FEATURES
HAS_AVX512_VNNI = {"+avx512f", "+avx512bw", "+avx512vnni"} <= _HOST_FEATURES
BLOCK_BYTES = 32  # stored weight bytes per activation scale (64 int4 or 32 int8 weights)
PREFETCH_AHEAD = 4096  # bytes; 2-4 KiB measured best, 256-1024 less so

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_bytes = ir.VectorType(_i8, 32)
_shorts = ir.VectorType(_i16, 16)
_ints = ir.VectorType(_i32, 8)
_floats = ir.VectorType(ir.FloatType(), 8)
_wide_bytes = ir.VectorType(_i8, 64)  # two blocks in one AVX-512 register
_wide_ints = ir.VectorType(_i32, 16)
_wide_floats = ir.VectorType(ir.FloatType(), 16)


def _splat(vector_type: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vector_type, [ir.Constant(vector_type.element, value)] * vector_type.count)


def _declare(builder: ir.IRBuilder, name: str, result, arguments) -> ir.Function:
    module = builder.module
    existing = module.globals.get(name)
    return existing or ir.Function(module, ir.FunctionType(result, arguments), name)


def _load_block(builder: ir.IRBuilder, address, offset, vector_type=_bytes) -> ir.Value:
    """32 bytes (or a vector_type's worth) at address + offset (any alignment)."""
    pointer = builder.inttoptr(builder.add(address, offset), vector_type.as_pointer())
    return builder.load(pointer, align=1)


def _counted_loop(builder: ir.IRBuilder, count, name: str, body, initial: ir.Value) -> ir.Value:
    """acc = initial; for i in range(count): acc = body(i, acc); -> acc (as LLVM blocks)."""
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_i64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    acc = builder.phi(initial.type)
    new_acc = body(i, acc)
    next_i = builder.add(i, ir.Constant(_i64, 1))
    end_of_body = builder.block  # the body may have added blocks of its own
    i.add_incoming(ir.Constant(_i64, 0), entry)
    i.add_incoming(next_i, end_of_body)
    acc.add_incoming(initial, entry)
    acc.add_incoming(new_acc, end_of_body)
    builder.cbranch(builder.icmp_signed("<", next_i, count), loop, done)
    builder.position_at_end(done)
    result = builder.phi(initial.type)
    result.add_incoming(initial, entry)
    result.add_incoming(new_acc, end_of_body)
    return result


def _counted_loop_values(builder: ir.IRBuilder, count, name: str, body, initials: list) -> list:
    """accs = initials; for i in range(count): accs = body(i, accs); -> accs (several values
    carried through the loop, as _counted_loop carries one)."""
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_i64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    accs = [builder.phi(v.type) for v in initials]
    new_accs = body(i, accs)
    next_i = builder.add(i, ir.Constant(_i64, 1))
    end_of_body = builder.block
    i.add_incoming(ir.Constant(_i64, 0), entry)
    i.add_incoming(next_i, end_of_body)
    for acc, initial, new in zip(accs, initials, new_accs):
        acc.add_incoming(initial, entry)
        acc.add_incoming(new, end_of_body)
    builder.cbranch(builder.icmp_signed("<", next_i, count), loop, done)
    builder.position_at_end(done)
    results = []
    for initial, new in zip(initials, new_accs):
        result = builder.phi(initial.type)
        result.add_incoming(initial, entry)
        result.add_incoming(new, end_of_body)
        results.append(result)
    return results


def _broadcast(builder: ir.IRBuilder, value: ir.Value, lanes: int = 8) -> ir.Value:
    vector_type = ir.VectorType(ir.FloatType(), lanes)
    vector = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(ir.VectorType(_i32, lanes), None))


def _lane_sum(builder: ir.IRBuilder, vector: ir.Value, lanes: int) -> ir.Value:
    total = builder.extract_element(vector, ir.Constant(_i32, 0))
    for lane in range(1, lanes):
        total = builder.fadd(total, builder.extract_element(vector, ir.Constant(_i32, lane)))
    return total


def _load_scalar(builder: ir.IRBuilder, address, index, element: ir.Type, size: int) -> ir.Value:
    offset = builder.mul(index, ir.Constant(_i64, size))
    return builder.load(builder.inttoptr(builder.add(address, offset), element.as_pointer()))


def _group_scale(builder: ir.IRBuilder, w_scale, g, lanes: int) -> ir.Value:
    """w_scale[g] (float16 bits) as float32 in every lane."""
    bits = _load_scalar(builder, w_scale, g, _i16, 2)
    scale = builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
    return _broadcast(builder, scale, lanes)


def _prefetch(builder: ir.IRBuilder, address) -> None:
    """Hint that the cache line at address will be read soon (no fault if it is not mapped)."""
    pointer = ir.IntType(8).as_pointer()
    hint = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [pointer, _i32, _i32, _i32])
    read, keep, data = ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)
    builder.call(hint, [builder.inttoptr(address, pointer), read, keep, data])


def _prefetch_ahead(builder: ir.IRBuilder, weights, offset) -> None:
    ahead = builder.add(offset, ir.Constant(_i64, PREFETCH_AHEAD))
    _prefetch(builder, builder.add(weights, ahead))


def _grouped_blocks(
    builder, n_groups, group_blocks, weights, x_scale, w_scale, block_sum
) -> ir.Value:
    """AVX2: sum over groups g of w_scale[g] (fp16 bits) * sum over the group's blocks b of
    x_scale[b] * float(block_sum(byte offset of b)); lanes summed once at the very end.
    The weight bytes (at address ``weights``) are prefetched PREFETCH_AHEAD bytes ahead."""
    zero = ir.Constant(_floats, None)

    def group(g, total):
        def block(k, acc):
            b = builder.add(builder.mul(g, group_blocks), k)
            offset = builder.mul(b, ir.Constant(_i64, BLOCK_BYTES))
            _prefetch_ahead(builder, weights, offset)
            ints = block_sum(offset)  # <8 x i32>
            scale = _broadcast(builder, _load_scalar(builder, x_scale, b, ir.FloatType(), 4))
            return builder.fadd(acc, builder.fmul(builder.sitofp(ints, _floats), scale))

        group_sum = _counted_loop(builder, group_blocks, "blocks", block, zero)
        return builder.fadd(total, builder.fmul(group_sum, _group_scale(builder, w_scale, g, 8)))

    return _lane_sum(builder, _counted_loop(builder, n_groups, "groups", group, zero), 8)


def _load_pair(builder: ir.IRBuilder, address, offset) -> ir.Value:
    """64 bytes (blocks b and b + 1) at address + offset."""
    return _load_block(builder, address, offset, _wide_bytes)


def _load_padded_block(builder: ir.IRBuilder, address, offset) -> ir.Value:
    """The 32 bytes at address + offset, then 32 zero bytes (a lone block as a pair)."""
    block = _load_block(builder, address, offset)
    lanes = ir.Constant(ir.VectorType(_i32, 64), [ir.Constant(_i32, i) for i in range(64)])
    return builder.shuffle_vector(block, ir.Constant(_bytes, None), lanes)


def _pair_scales(builder: ir.IRBuilder, x_scale, b) -> ir.Value:
    """x_scale[b] in lanes 0-7, x_scale[b + 1] in lanes 8-15."""
    pair_type = ir.VectorType(ir.FloatType(), 2)
    address = builder.add(x_scale, builder.mul(b, ir.Constant(_i64, 4)))
    pair = builder.load(builder.inttoptr(address, pair_type.as_pointer()), align=4)
    lanes = ir.Constant(ir.VectorType(_i32, 16), [ir.Constant(_i32, i // 8) for i in range(16)])
    return builder.shuffle_vector(pair, pair, lanes)


def _fma(builder: ir.IRBuilder, a, b, c) -> ir.Value:
    """a * b + c in 16 lanes, rounded once (one instruction where two were)."""
    fma = _declare(builder, "llvm.fma.v16f32", _wide_floats, [_wide_floats] * 3)
    return builder.call(fma, [a, b, c])


def _grouped_pairs(
    builder, n_groups, group_blocks, rows, tokens, pair_sums, pair_scale, block_scale
) -> list:
    """AVX-512: _grouped_blocks two blocks per step, in 16 lanes (lanes 0-7 hold block b's
    sums, 8-15 block b + 1's), for one weight row and token or a tile of rows x tokens, each
    weight load shared by the tile's tokens and each activation load by its rows.

    rows: (weight address, fp16 scale address) per weight row, prefetched PREFETCH_AHEAD ahead;
    pair_sums(load, offset) -> one <16 x i32> per (row, token), row-major, reading its operands
    with ``load``: _load_pair, or _load_padded_block for the last block of a group of odd length;
    pair_scale(j, b) -> token j's activation scales of blocks b, b + 1 (lanes 0-7, 8-15);
    block_scale(j, b) -> token j's scale of block b alone. -> a float32 per (row, token).
    The decode and tile kernels build the same arithmetic per (row, token) here, so they agree
    bit for bit."""
    zero = ir.Constant(_wide_floats, None)
    one, two = ir.Constant(_i64, 1), ir.Constant(_i64, 2)
    tile = len(rows) * tokens

    def scaled(sums, scales, accs):
        return [
            _fma(builder, builder.sitofp(ints, _wide_floats), scales[i % tokens], acc)
            for i, (ints, acc) in enumerate(zip(sums, accs))
        ]

    def group(g, totals):
        first = builder.mul(g, group_blocks)

        def pair(k, accs):
            b = builder.add(first, builder.mul(k, two))
            offset = builder.mul(b, ir.Constant(_i64, BLOCK_BYTES))
            for weights, _ in rows:
                _prefetch_ahead(builder, weights, offset)
            scales = [pair_scale(j, b) for j in range(tokens)]
            return scaled(pair_sums(_load_pair, offset), scales, accs)

        def last_block(_, accs):
            b = builder.add(first, builder.sub(group_blocks, one))
            offset = builder.mul(b, ir.Constant(_i64, BLOCK_BYTES))
            scales = [block_scale(j, b) for j in range(tokens)]
            return scaled(pair_sums(_load_padded_block, offset), scales, accs)

        pair_count = builder.sdiv(group_blocks, two)
        pairs = _counted_loop_values(builder, pair_count, "pairs", pair, [zero] * tile)
        odd = builder.srem(group_blocks, two)  # 0 or 1 lone blocks
        group_sums = _counted_loop_values(builder, odd, "last", last_block, pairs)
        scales = [_group_scale(builder, w_scale, g, 16) for _, w_scale in rows]
        return [
            _fma(builder, s, scales[i // tokens], t)
            for i, (s, t) in enumerate(zip(group_sums, totals))
        ]

    totals = _counted_loop_values(builder, n_groups, "groups", group, [zero] * tile)
    return [_lane_sum(builder, total, 16) for total in totals]


def _one_token_pairs(builder, n_groups, group_blocks, weights, x_scale, w_scale, pair_sum):
    """_grouped_pairs for the decode kernels: one token, its scales x_scale [n] float32."""

    def block_scale(_, b):
        return _broadcast(builder, _load_scalar(builder, x_scale, b, ir.FloatType(), 4), 16)

    (result,) = _grouped_pairs(
        builder,
        n_groups,
        group_blocks,
        [(weights, w_scale)],
        1,
        lambda load, offset: [pair_sum(load, offset)],
        lambda _, b: _pair_scales(builder, x_scale, b),
        block_scale,
    )
    return result


def _vpdpbusd(builder: ir.IRBuilder, acc, unsigned_bytes, signed_bytes) -> ir.Value:
    """acc [16 x i32] + sums of 4 neighbouring u8 * s8 products (AVX-512 VNNI, exact)."""
    dot = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", _wide_ints, [_wide_ints] * 3)
    operands = [builder.bitcast(v, _wide_ints) for v in (unsigned_bytes, signed_bytes)]
    return builder.call(dot, [acc, *operands])


_INT4_SIGNATURE = types.float32(*[types.intp] * 7)
_INT8_SIGNATURE = types.float32(*[types.intp] * 6)


def _int4_codegen(wide: bool):
    def codegen(context, builder, sig, args):
        packed, x_even, x_odd, x_scale, w_scale, n_groups, group_blocks = args
        if wide:

            def pair_sum(load, offset):
                nibbles = builder.xor(load(builder, packed, offset), _splat(_wide_bytes, 0x88))
                high = builder.lshr(nibbles, _splat(_wide_bytes, 4))  # columns 2k: s + 8
                low = builder.and_(nibbles, _splat(_wide_bytes, 15))  # columns 2k+1: s + 8
                acc = ir.Constant(_wide_ints, None)
                acc = _vpdpbusd(builder, acc, high, load(builder, x_even, offset))
                return _vpdpbusd(builder, acc, low, load(builder, x_odd, offset))

            return _one_token_pairs(
                builder, n_groups, group_blocks, packed, x_scale, w_scale, pair_sum
            )
        maddubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _shorts, [_bytes, _bytes])
        madd = _declare(builder, "llvm.x86.avx2.pmadd.wd", _ints, [_shorts, _shorts])

        def block_sum(offset):
            offset_nibbles = builder.xor(_load_block(builder, packed, offset), _splat(_bytes, 0x88))
            high = builder.lshr(offset_nibbles, _splat(_bytes, 4))  # columns 2k: s + 8
            low = builder.and_(offset_nibbles, _splat(_bytes, 15))  # columns 2k+1: s + 8
            pairs = builder.add(
                builder.call(maddubs, [high, _load_block(builder, x_even, offset)]),
                builder.call(maddubs, [low, _load_block(builder, x_odd, offset)]),
            )  # |each| <= 4 * 15 * 127 < 2^15
            return builder.call(madd, [pairs, _splat(_shorts, 1)])

        return _grouped_blocks(builder, n_groups, group_blocks, packed, x_scale, w_scale, block_sum)

    return codegen


def _int8_codegen(wide: bool):
    def codegen(context, builder, sig, args):
        q, x, x_scale, w_scale, n_groups, group_blocks = args
        if wide:

            def pair_sum(load, offset):
                weights = load(builder, q, offset)
                negative = builder.icmp_signed("<", weights, ir.Constant(_wide_bytes, None))
                magnitude = builder.select(negative, builder.neg(weights), weights)  # 128 stays
                activations = load(builder, x, offset)
                signed_x = builder.select(negative, builder.neg(activations), activations)
                return _vpdpbusd(builder, ir.Constant(_wide_ints, None), magnitude, signed_x)

            return _one_token_pairs(builder, n_groups, group_blocks, q, x_scale, w_scale, pair_sum)
        maddubs = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _shorts, [_bytes, _bytes])
        madd = _declare(builder, "llvm.x86.avx2.pmadd.wd", _ints, [_shorts, _shorts])
        sign = _declare(builder, "llvm.x86.avx2.psign.b", _bytes, [_bytes, _bytes])

        def block_sum(offset):
            weights = _load_block(builder, q, offset)
            negative = builder.icmp_signed("<", weights, ir.Constant(_bytes, None))
            magnitude = builder.select(negative, builder.neg(weights), weights)  # |q|, 128 stays
            signed_x = builder.call(sign, [_load_block(builder, x, offset), weights])
            pairs = builder.call(maddubs, [magnitude, signed_x])  # |each| <= 2 * 128 * 127
            return builder.call(madd, [pairs, _splat(_shorts, 1)])

        return _grouped_blocks(builder, n_groups, group_blocks, q, x_scale, w_scale, block_sum)

    return codegen


# Addresses of packed uint8 [n*32], x_even/x_odd int8 [n*32], x_scale float32 [n],
# w_scale fp16 bits [n_groups]; n = n_groups * group_blocks.
@intrinsic
def dot_int4_blocks_avx2(typingctx, packed, x_even, x_odd, x_scale, w_scale, n_groups, blocks):
    return _INT4_SIGNATURE, _int4_codegen(wide=False)


@intrinsic
def dot_int4_blocks_avx512(typingctx, packed, x_even, x_odd, x_scale, w_scale, n_groups, blocks):
    return _INT4_SIGNATURE, _int4_codegen(wide=True)


# Addresses of q int8 [n*32], x int8 [n*32] (in -127..127), x_scale float32 [n],
# w_scale fp16 bits [n_groups]; n = n_groups * group_blocks.
@intrinsic
def dot_int8_blocks_avx2(typingctx, q, x, x_scale, w_scale, n_groups, group_blocks):
    return _INT8_SIGNATURE, _int8_codegen(wide=False)


@intrinsic
def dot_int8_blocks_avx512(typingctx, q, x, x_scale, w_scale, n_groups, group_blocks):
    return _INT8_SIGNATURE, _int8_codegen(wide=True)


dot_int4_blocks = dot_int4_blocks_avx512 if HAS_AVX512_VNNI else dot_int4_blocks_avx2
dot_int8_blocks = dot_int8_blocks_avx512 if HAS_AVX512_VNNI else dot_int8_blocks_avx2


# ------------------------------------------------------------------ tiles (prefill)
# A prompt multiplies many activation rows by the same weight rows. The tile kernels take a few
# weight rows x TILE_TOKENS rows of x at once: each weight pair is loaded (and its nibbles
# unpacked) once and meets every token of the tile, and each activation pair is loaded once and
# meets every weight row of the tile. Per (row, token) they compute exactly what
# dot_int4_blocks / dot_int8_blocks (AVX-512) compute, in the same order, so a prompt read at
# once and one read token by token give bit-identical projections.
#
# Tile shapes measured on [13696, 4096], GOP/s at 16 / 128 / 512 tokens (one run each, 2
# threads; 1 x 4 was the previous kernel: int4 194 / 163 / 191, int8 191 / 194 / 191):
#   int4 per row: 2 x 4 310 / 352 / 347, 4 x 4 227 / 259 / 252, 4 x 3 228 / 289 / 293;
#   int8 per row: 4 x 4 204 / 275 / 261, 4 x 3 208 / 289 / 299, 2 x 4 188 / 260 / 267;
#   int4 groups of 128 (a group is one pair, converted and scaled twice): 80-87 at any shape
#   while multirow took the + 8 back in a scalar loop per token; see multirow for the figures.
# Beyond 2 x 4 (int4) the 16-lane accumulators (one per row x token) and the tokens' activation
# pairs no longer fit in the 32 registers and LLVM spills them.
#
# What bounds these tiles is decode's summation order: every 2 vpdpbusd leave 16 lanes of
# partial sums that each take a conversion and an FMA of their own. A layout with one token per
# lane (the weights' unpacked 4-byte groups broadcast against 16 tokens' activations, one
# conversion and FMA per whole block) ran 750-1060 GOP/s at 128-512 tokens, but decode must then
# form each block's whole integer sum before scaling it (lanes added across 16 rows, or per row
# and transposed), and measured 15-40 % slower than it is now out of cache: not taken.
TILE_TOKENS = 4
INT4_TILE_ROWS = 2
INT8_TILE_ROWS = 4


def _tile_pairs(builder, n_groups, group_blocks, rows, x_scale, scale_stride, pair_sums):
    """_grouped_pairs for a tile; token j's scales start at x_scale + j * scale_stride."""
    scale_rows = _addresses(builder, x_scale, scale_stride, TILE_TOKENS)

    def block_scale(j, b):
        return _broadcast(builder, _load_scalar(builder, scale_rows[j], b, ir.FloatType(), 4), 16)

    return _grouped_pairs(
        builder,
        n_groups,
        group_blocks,
        rows,
        TILE_TOKENS,
        pair_sums,
        lambda j, b: _pair_scales(builder, scale_rows[j], b),
        block_scale,
    )


def _addresses(builder, base, stride, count: int) -> list:
    """base + j * stride for each j < count (each token, or each weight row, of a tile)."""
    return [builder.add(base, builder.mul(ir.Constant(_i64, j), stride)) for j in range(count)]


def _store_results(builder, out, out_stride, results, n_rows: int) -> None:
    """results[r * TILE_TOKENS + j] -> out[j, r] (float32, rows of out out_stride bytes)."""
    for j, address in enumerate(_addresses(builder, out, out_stride, TILE_TOKENS)):
        for r in range(n_rows):
            at = builder.add(address, ir.Constant(_i64, 4 * r))
            value = results[r * TILE_TOKENS + j]
            builder.store(value, builder.inttoptr(at, ir.FloatType().as_pointer()))


def _weight_rows(builder, weights, row_stride, w_scale, w_scale_stride, n_rows: int) -> list:
    """[(address of weight row r, address of its scales)] for the tile's n_rows rows."""
    return list(
        zip(
            _addresses(builder, weights, row_stride, n_rows),
            _addresses(builder, w_scale, w_scale_stride, n_rows),
        )
    )


def _int4_tile_codegen(n_rows: int):
    def codegen(context, builder, sig, args):
        packed, row_stride, x_even, x_odd, x_scale, w_scale, w_scale_stride = args[:7]
        n_groups, group_blocks, x_stride, scale_stride, out, out_stride = args[7:]
        rows = _weight_rows(builder, packed, row_stride, w_scale, w_scale_stride, n_rows)
        evens = _addresses(builder, x_even, x_stride, TILE_TOKENS)
        odds = _addresses(builder, x_odd, x_stride, TILE_TOKENS)

        def pair_sums(load, offset):
            tokens = [
                (load(builder, even, offset), load(builder, odd, offset))
                for even, odd in zip(evens, odds)
            ]
            sums = []
            for weights, _ in rows:
                nibbles = builder.xor(load(builder, weights, offset), _splat(_wide_bytes, 0x88))
                high = builder.lshr(nibbles, _splat(_wide_bytes, 4))
                low = builder.and_(nibbles, _splat(_wide_bytes, 15))
                for even, odd in tokens:
                    acc = _vpdpbusd(builder, ir.Constant(_wide_ints, None), high, even)
                    sums.append(_vpdpbusd(builder, acc, low, odd))
            return sums

        results = _tile_pairs(
            builder, n_groups, group_blocks, rows, x_scale, scale_stride, pair_sums
        )
        _store_results(builder, out, out_stride, results, n_rows)
        return context.get_dummy_value()

    return codegen


def _int8_tile_codegen(n_rows: int):
    def codegen(context, builder, sig, args):
        q, row_stride, x, x_scale, w_scale, w_scale_stride = args[:6]
        n_groups, group_blocks, x_stride, scale_stride, out, out_stride = args[6:]
        rows = _weight_rows(builder, q, row_stride, w_scale, w_scale_stride, n_rows)
        xs = _addresses(builder, x, x_stride, TILE_TOKENS)

        def pair_sums(load, offset):
            # Σ x q = Σ (x + 128) q - 128 Σ q: start each token's sums at -128 Σ q (once per
            # weight pair), then one vpdpbusd per token with x + 128 as the unsigned operand.
            tokens = [load(builder, row, offset) for row in xs]
            sums = []
            for weights, _ in rows:
                w = load(builder, weights, offset)
                sum_128q = _vpdpbusd(
                    builder, ir.Constant(_wide_ints, None), _splat(_wide_bytes, 128), w
                )
                start = builder.neg(sum_128q)
                sums.extend(_vpdpbusd(builder, start, activations, w) for activations in tokens)
            return sums

        results = _tile_pairs(
            builder, n_groups, group_blocks, rows, x_scale, scale_stride, pair_sums
        )
        _store_results(builder, out, out_stride, results, n_rows)
        return context.get_dummy_value()

    return codegen


_TILE_INT4_SIGNATURE = types.void(*[types.intp] * 13)
_TILE_INT8_SIGNATURE = types.void(*[types.intp] * 12)


# Addresses as dot_int4_blocks, for weight row 0 and token 0 of the tile; weight row r starts
# r * row_stride bytes further and its scales r * w_scale_stride bytes; token j's x_even/x_odd
# rows start j * x_stride bytes further, its x_scale row j * scale_stride bytes; the result of
# (row r, token j) is stored at out + j * out_stride + 4 r (float32); INT4_TILE_ROWS rows.
@intrinsic
def dot_int4_tile(
    typingctx, packed, row_stride, x_even, x_odd, x_scale, w_scale, w_scale_stride, n_groups,
    blocks, x_stride, scale_stride, out, out_stride,
):  # fmt: skip
    return _TILE_INT4_SIGNATURE, _int4_tile_codegen(INT4_TILE_ROWS)


# Addresses as dot_int8_blocks, rows and tokens laid out as in dot_int4_tile, but x holds
# x + 128 as uint8 (x_q ^ 0x80): the sums are the same integers; INT8_TILE_ROWS rows.
@intrinsic
def dot_int8_tile(
    typingctx, q, row_stride, x, x_scale, w_scale, w_scale_stride, n_groups, blocks, x_stride,
    scale_stride, out, out_stride,
):  # fmt: skip
    return _TILE_INT8_SIGNATURE, _int8_tile_codegen(INT8_TILE_ROWS)
