"""A linear layer over weights in any storage: float32, float16, bfloat16 bits, or quantised."""

from __future__ import annotations

import numpy as np

from glm_numpy import kernels
from glm_numpy.compute import BF16Compute, round_to_bf16
from glm_numpy.dtypes import to_float32
from glm_numpy.quantize import QuantizedWeight


def linear_reference(x: np.ndarray, w, bias: np.ndarray | None = None) -> np.ndarray:
    """x [..., I], w [O, I] (torch's [out, in] layout) -> x @ w.T + bias, [..., O] float32.

    The definition: widen the whole weight to float32, then one matrix product. Readable, but
    it writes a float32 copy of W (twice its 16-bit size) for every call. A BF16Compute weight
    multiplies bf16(x) by bf16(W).
    """
    x = np.asarray(x, dtype=np.float32)
    if isinstance(w, BF16Compute):
        x, weight = round_to_bf16(x), round_to_bf16(to_float32(w.weight))  # [..., I], [O, I]
    elif isinstance(w, QuantizedWeight):
        weight = w.dequantize()  # [O, I]
    else:
        weight = to_float32(w)  # [O, I]
    y = x @ weight.T  # [..., O]
    if bias is not None:
        y += to_float32(bias)
    return y


def round_activations(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [T, I] -> (x_q [T, I] int8 in -127..127, scale [T, I/block] float32), x ≈ x_q * scale
    with one absmax scale per block of columns (as llama.cpp's q8 activations)."""
    blocks = np.asarray(x, dtype=np.float32).reshape(x.shape[0], -1, block)  # [T, I/block, block]
    scale = np.abs(blocks).max(axis=-1) / np.float32(127.0)  # [T, I/block]
    safe = np.where(scale > 0, scale, np.float32(1.0))
    inverse = np.where(scale > 0, np.float32(1.0) / safe, np.float32(0.0))[..., None]
    x_q = np.rint(blocks * inverse).astype(np.int8)
    return x_q.reshape(x.shape), scale


def linear_integer_reference(x: np.ndarray, w: QuantizedWeight) -> np.ndarray:
    """x [T, I], w quantised [O, I] -> [T, O]: what the integer kernels compute (weights with
    float16 scales and whole 32-byte blocks per group; glm_numpy.kernels.intdot).

    x is rounded to int8 first, one scale per 32 stored weight bytes (32 int8 or 64 int4
    columns), the same for every number of rows, so a prompt and its decode steps agree; then
    the rounded x times the quantised W.
    """
    x = np.asarray(x, dtype=np.float32)
    block = 32 * (2 if w.bits == 4 else 1)
    x_q, scale = round_activations(x, block)
    rounded = (x_q.reshape(x.shape[0], -1, block) * scale[..., None]).reshape(x.shape)
    return rounded @ w.dequantize().T  # [T, O]


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
