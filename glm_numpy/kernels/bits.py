"""Bit-level conversions numba cannot spell by itself: 16-bit floats held as uint16 -> float32.

numba has no float16 arrays on the CPU, so a 16-bit weight is held as its raw bits in a uint16
array and widened one element at a time inside the kernels. Both conversions are exact.

- fp16: an LLVM ``fpext half -> float``, which compiles to the hardware ``vcvtph2ps``.
- bf16: bfloat16 is the top half of a float32, so shift the bits up by 16 and reinterpret.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def fp16_bits_to_float32(typingctx, bits):
    """uint16 (IEEE half bits) -> float32, exactly (subnormals, inf and NaN included)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def bf16_bits_to_float32(typingctx, bits):
    """uint16 (bfloat16 bits) -> float32, exactly: the bits become the top half of a float32."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        shifted = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(shifted, ir.FloatType())

    return types.float32(types.uint16), codegen


def scale_to_float32(value):
    """A quantisation scale as float32: float16 scales arrive as their uint16 bits (widened
    here), float32 ones as they are. Resolved per argument type when a kernel compiles."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(scale_to_float32)
def _scale_to_float32(value):
    if value == types.uint16:
        return lambda value: fp16_bits_to_float32(value)
    if value == types.float32:
        return lambda value: value
    return None
