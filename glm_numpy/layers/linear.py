"""A linear layer over weights in any storage: float32, float16, bfloat16 bits, or quantised."""

from __future__ import annotations

import numpy as np

from glm_numpy import kernels
from glm_numpy.dtypes import to_float32
from glm_numpy.quantize import QuantizedWeight


def linear_reference(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """x [..., I], w [O, I] (torch's [out, in] layout) -> x @ w.T + bias, [..., O] float32.

    The definition: widen the whole weight to float32, then one matrix product. Readable, but
    it writes a float32 copy of W (twice its 16-bit size) for every call.
    """
    weight = w.dequantize() if isinstance(w, QuantizedWeight) else to_float32(w)  # [O, I]
    y = np.asarray(x, dtype=np.float32) @ weight.T  # [..., O]
    if bias is not None:
        y += to_float32(bias)
    return y


def linear(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """x [..., I], w [O, I] -> x @ w.T + bias, [..., O] float32: ``linear_reference`` computed by
    the numba kernels (glm_numpy.kernels.dispatch, tested to agree with it).

    The weight is widened to float32 inside the kernels, at the point of use, so the stored model
    stays in its 16-bit or quantised form and is read once per call.
    """
    if not kernels.usable():  # a forked child: OpenMP cannot run here
        return linear_reference(x, w, bias)
    x = np.asarray(x, dtype=np.float32)
    y = kernels.project(x.reshape(-1, x.shape[-1]), w)  # [T, O] with T = all leading axes flattened
    if bias is not None:
        y += to_float32(bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
