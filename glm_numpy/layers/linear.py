"""A linear layer over weights in any storage: float32, float16, bfloat16 bits, or quantised."""

from __future__ import annotations

import numpy as np

from glm_numpy.dtypes import to_float32
from glm_numpy.quantize import QuantizedWeight


def linear(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """x [..., I], w [O, I] (torch's [out, in] layout) -> x @ w.T + bias, [..., O] float32.

    The weight is widened to float32 here, at the point of use, so the stored model stays in its
    16-bit or quantised form.
    """
    weight = w.dequantize() if isinstance(w, QuantizedWeight) else to_float32(w)  # [O, I]
    y = np.asarray(x, dtype=np.float32) @ weight.T  # [..., O]
    if bias is not None:
        y += to_float32(bias)
    return y
