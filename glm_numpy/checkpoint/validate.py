"""Check a checkpoint against its config before the first forward pass.

Every tensor's name, shape and dtype is compared with the official layout the config implies
(glm_numpy.checkpoint.layout); norm weights must be finite. All problems are gathered into ONE
CheckpointError, each line naming the file and the tensor, so a broken download or a config
that belongs to another model is reported plainly instead of as a numpy traceback mid-forward.
(File-level damage — truncation, corrupt headers, missing shards, duplicates — is already
reported by load_checkpoint.)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError
from glm_numpy.checkpoint.layout import TensorSpec, official_tensors
from glm_numpy.config import ChatGLM2Config
from glm_numpy.dtypes import FLOAT_DTYPES, dtype_name, to_float32

MAX_REPORTED = 12  # problems listed in the error before "... and N more"

# Which storage dtypes each kind of tensor may have.
ALLOWED_DTYPES = {
    "embedding": set(FLOAT_DTYPES.values()),
    "inv_freq": set(FLOAT_DTYPES.values()),
    "norm": set(FLOAT_DTYPES.values()),
    "linear": set(FLOAT_DTYPES.values()),
    "bias": set(FLOAT_DTYPES.values()),
    "quantized": {np.dtype(np.int8)},
    "scale": set(FLOAT_DTYPES.values()),
}


def validate_checkpoint(checkpoint: Mapping[str, np.ndarray], config: ChatGLM2Config) -> None:
    """Raise one CheckpointError listing every mismatch between checkpoint and config."""
    problems = checkpoint_problems(checkpoint, config)
    if problems:
        where = getattr(checkpoint, "path", "checkpoint")
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(f"... and {len(problems) - MAX_REPORTED} more")
        raise CheckpointError(
            f"{where}: does not match its config "
            f"({_describe_config(config)}):\n  " + "\n  ".join(shown)
        )


def checkpoint_problems(checkpoint: Mapping[str, np.ndarray], config: ChatGLM2Config) -> list:
    """Every mismatch as a line of text naming the file and the tensor (empty when fine)."""
    expected = {spec.name: spec for spec in official_tensors(config)}
    source = _source_function(checkpoint)
    wrong, unexpected = [], []
    for name, array in checkpoint.items():
        spec = expected.get(name)
        if spec is None:
            unexpected.append(f"{source(name)}: unexpected tensor {name!r} {_describe(array)}")
        elif problem := tensor_problem(spec, array, config):
            wrong.append(f"{source(name)}: tensor {name!r}: {problem}")
    missing = [
        f"missing tensor {name!r} (expected shape {list(spec.shape)})"
        for name, spec in expected.items()
        if name not in checkpoint
    ]
    # Wrong tensors first: they usually explain the rest (e.g. a config for another size).
    problems = wrong + unexpected + missing
    problems += _index_size_problems(checkpoint)
    return problems


def tensor_problem(spec: TensorSpec, array: np.ndarray, config: ChatGLM2Config) -> str | None:
    """What is wrong with one tensor, or None."""
    if array.dtype not in ALLOWED_DTYPES[spec.kind]:
        allowed = sorted(dtype_name(d) for d in ALLOWED_DTYPES[spec.kind])
        hint = _quantization_hint(spec, array, config)
        return f"dtype {dtype_name(array.dtype)}, expected one of {allowed}{hint}"
    if tuple(array.shape) != spec.shape:
        return f"shape {list(array.shape)}, expected {list(spec.shape)} for this config"
    if spec.kind == "norm" and not np.isfinite(to_float32(array)).all():
        bad = int(np.count_nonzero(~np.isfinite(to_float32(array))))
        return f"{bad} non-finite value(s) in a norm weight (corrupt file?)"
    return None


def _quantization_hint(spec: TensorSpec, array: np.ndarray, config: ChatGLM2Config) -> str:
    if spec.kind == "linear" and array.dtype == np.int8:
        return " (an int8 weight: is quantization_bit missing from config.json?)"
    if spec.kind == "quantized":
        return f" (config.json says quantization_bit={config.quantization_bit})"
    return ""


def _index_size_problems(checkpoint: Mapping[str, np.ndarray]) -> list[str]:
    """The index's metadata.total_size must equal the bytes of the tensors actually found."""
    metadata = getattr(checkpoint, "index_metadata", None) or {}
    total = metadata.get("total_size")
    found = sum(array.nbytes for array in checkpoint.values())
    if isinstance(total, int) and total != found:
        where = getattr(checkpoint, "path", "index")
        return [f"{where}: metadata.total_size is {total} bytes but the shards hold {found}"]
    return []


def _source_function(checkpoint: Mapping[str, np.ndarray]):
    if hasattr(checkpoint, "source"):
        return checkpoint.source
    return lambda name: "checkpoint"


def _describe(array: np.ndarray) -> str:
    return f"({dtype_name(array.dtype)} {list(array.shape)})"


def _describe_config(config: ChatGLM2Config) -> str:
    text = (
        f"L={config.num_layers} D={config.hidden_size} H={config.num_attention_heads} "
        f"G={config.num_kv_groups} Dh={config.head_dim} F={config.ffn_hidden_size} "
        f"V={config.padded_vocab_size}"
    )
    if config.quantization_bit:
        text += f" int{config.quantization_bit}"
    return text
