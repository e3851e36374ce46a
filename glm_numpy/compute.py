"""The arithmetic of 16-bit weights: ``compute="float32"`` (the default) or ``"bf16"``.

float32: each 16-bit weight is widened to float32 exactly and multiplied by float32 activations
(the products of the official model, summed in float32).

bf16: activations and weights are rounded to bfloat16 (8 significant bits) and their products
summed in float32, as torch computes a bf16 model on a CPU. With AVX512-BF16 one instruction
(``vdpbf16ps``) does 32 such multiply-adds: prompts are read faster, at about 2-3 significant
digits per product (docs/numerics.md, measured). Quantised weights are unaffected (their
activations are already rounded to int8). A CPU without AVX512-BF16 computes in float32 instead,
and says so once.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from glm_numpy.dtypes import float32_to_bfloat16

COMPUTE_MODES = ("float32", "bf16")


@dataclasses.dataclass(frozen=True)
class BF16Compute:
    """A 16-bit weight [O, I] multiplied in bfloat16: ``linear`` rounds x and W to bfloat16 and
    sums the products in float32."""

    weight: np.ndarray  # float16, or bfloat16 bits (uint16)

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 values (ties to even), as float32."""
    bits = float32_to_bfloat16(np.asarray(values, dtype=np.float32)).astype(np.uint32) << 16
    return bits.view(np.float32)


def check_compute(compute: str) -> bool:
    """Validate a compute mode; -> whether to multiply 16-bit weights in bf16 on this CPU."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute={compute!r}: expected one of {', '.join(COMPUTE_MODES)}")
    if compute == "float32":
        return False
    from glm_numpy.kernels.bf16dot import HAS_AVX512_BF16

    if not HAS_AVX512_BF16:
        warnings.warn(
            'compute="bf16": this CPU has no AVX512-BF16 (vdpbf16ps); computing in float32',
            stacklevel=3,
        )
    return HAS_AVX512_BF16


def with_compute(weight, bf16: bool):
    """A linear weight as ``linear`` should multiply it: 16-bit weights wrapped in BF16Compute
    when bf16, anything else (float32, quantised) as it is."""
    if bf16 and isinstance(weight, np.ndarray) and weight.dtype.itemsize == 2:
        return BF16Compute(weight)
    return weight
