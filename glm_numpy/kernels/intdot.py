"""Integer dot products on AVX2 for quantised weights: 32 bytes of weights per step.

Widening int8/int4 weights to float costs several instructions per weight, too many to keep up
with memory at 4 bits. So the decode kernels quantise the activation row too (int8, one scale
per block of 32 stored bytes, as llama.cpp does) and multiply integers: ``vpmaddubsw`` multiplies
32 unsigned bytes by 32 signed bytes and adds neighbouring pairs into 16-bit sums, ``vpmaddwd``
adds those into eight 32-bit sums. Each block's integer sum is turned into float32 and scaled by
its activation scale and its group's weight scale.

numba cannot express these instructions, so each kernel is an LLVM loop written with llvmlite
(``numba.extending.intrinsic``), taking raw addresses from the caller:

    dot_int4_blocks(packed, x_even, x_odd, x_scale, w_scale, n_groups, group_blocks) -> float32
        sum over groups g of w_scale[g] * sum over its blocks b of
        x_scale[b] * sum_k u(packed[b, k]) · (x_even, x_odd)[b, k],
        u = both nibbles of byte ^ 0x88 = signed value + 8, in 0..15 (the caller subtracts 8·Σx)
    dot_int8_blocks(q, x, x_scale, w_scale, n_groups, group_blocks) -> float32
        the same with q[b] · x[b]; the signed q rides on x's sign (|q| · sign(x, q)), so
        vpmaddubsw's unsigned operand is |q| <= 128, and no 16-bit sum overflows.

The weight scales (float16 bits) are applied per group to 8-lane vectors, and the lanes are
added once per row: a horizontal sum per group would cost as much as the group's products.

Each block also asks the cache for the weight bytes ``PREFETCH_AHEAD`` further on. A row is
only a few KiB, and the hardware prefetcher alone left the loop waiting on memory: with the
software prefetch the int4 kernel read [13696, 4096] weights at ~15 GB/s instead of ~11-13.

Available only where the CPU has AVX2 (``HAS_AVX2``) and for float16 weight scales; elsewhere the
float kernels run.

Editing this file: numba's on-disk cache of the kernels in matvec.py is keyed on matvec.py alone,
so touch matvec.py (or delete its __pycache__) or the old code keeps running.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

HAS_AVX2 = "+avx2" in llvm.get_host_cpu_features().flatten().split(",")
BLOCK_BYTES = 32  # stored weight bytes per activation scale (64 int4 or 32 int8 weights)
PREFETCH_AHEAD = 4096  # bytes; 2-4 KiB measured best, 256-1024 less so

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_bytes = ir.VectorType(_i8, 32)
_shorts = ir.VectorType(_i16, 16)
_ints = ir.VectorType(_i32, 8)
_floats = ir.VectorType(ir.FloatType(), 8)


def _splat(vector_type: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(vector_type, [ir.Constant(vector_type.element, value)] * vector_type.count)


def _declare(builder: ir.IRBuilder, name: str, result, arguments) -> ir.Function:
    module = builder.module
    existing = module.globals.get(name)
    return existing or ir.Function(module, ir.FunctionType(result, arguments), name)


def _load_block(builder: ir.IRBuilder, address, offset) -> ir.Value:
    """32 bytes at address + offset (any alignment)."""
    pointer = builder.inttoptr(builder.add(address, offset), _bytes.as_pointer())
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


def _broadcast(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    vector = builder.insert_element(ir.Constant(_floats, None), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vector, vector, ir.Constant(_ints, None))


def _load_scalar(builder: ir.IRBuilder, address, index, element: ir.Type, size: int) -> ir.Value:
    offset = builder.mul(index, ir.Constant(_i64, size))
    return builder.load(builder.inttoptr(builder.add(address, offset), element.as_pointer()))


def _prefetch(builder: ir.IRBuilder, address) -> None:
    """Hint that the cache line at address will be read soon (no fault if it is not mapped)."""
    pointer = ir.IntType(8).as_pointer()
    hint = _declare(builder, "llvm.prefetch.p0i8", ir.VoidType(), [pointer, _i32, _i32, _i32])
    read, keep, data = ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)
    builder.call(hint, [builder.inttoptr(address, pointer), read, keep, data])


def _grouped_blocks(
    builder, n_groups, group_blocks, weights, x_scale, w_scale, block_sum
) -> ir.Value:
    """sum over groups g of w_scale[g] (fp16 bits) * sum over the group's blocks b of
    x_scale[b] * float(block_sum(byte offset of b)); lanes summed once at the very end.
    The weight bytes (at address ``weights``) are prefetched PREFETCH_AHEAD bytes ahead."""
    zero = ir.Constant(_floats, None)

    def group(g, total):
        def block(k, acc):
            b = builder.add(builder.mul(g, group_blocks), k)
            offset = builder.mul(b, ir.Constant(_i64, BLOCK_BYTES))
            _prefetch(
                builder,
                builder.add(weights, builder.add(offset, ir.Constant(_i64, PREFETCH_AHEAD))),
            )
            ints = block_sum(offset)  # <8 x i32>
            scale = _broadcast(builder, _load_scalar(builder, x_scale, b, ir.FloatType(), 4))
            return builder.fadd(acc, builder.fmul(builder.sitofp(ints, _floats), scale))

        group_sum = _counted_loop(builder, group_blocks, "blocks", block, zero)
        bits = _load_scalar(builder, w_scale, g, _i16, 2)
        scale = builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
        return builder.fadd(total, builder.fmul(group_sum, _broadcast(builder, scale)))

    final = _counted_loop(builder, n_groups, "groups", group, zero)
    total = builder.extract_element(final, ir.Constant(_i32, 0))
    for lane in range(1, 8):
        total = builder.fadd(total, builder.extract_element(final, ir.Constant(_i32, lane)))
    return total


@intrinsic
def dot_int4_blocks(typingctx, packed, x_even, x_odd, x_scale, w_scale, n_groups, group_blocks):
    """Addresses of packed uint8 [n*32], x_even/x_odd int8 [n*32], x_scale float32 [n],
    w_scale fp16 bits [n_groups]; n = n_groups * group_blocks."""
    signature = types.float32(*[types.intp] * 7)

    def codegen(context, builder, sig, args):
        packed, x_even, x_odd, x_scale, w_scale, n_groups, group_blocks = args
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

    return signature, codegen


@intrinsic
def dot_int8_blocks(typingctx, q, x, x_scale, w_scale, n_groups, group_blocks):
    """Addresses of q int8 [n*32], x int8 [n*32] (in -127..127), x_scale float32 [n],
    w_scale fp16 bits [n_groups]; n = n_groups * group_blocks."""
    signature = types.float32(*[types.intp] * 6)

    def codegen(context, builder, sig, args):
        q, x, x_scale, w_scale, n_groups, group_blocks = args
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

    return signature, codegen
