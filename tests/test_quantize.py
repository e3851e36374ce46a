"""Quantisation: the packing, the group-wise scheme, the quantize command, and what it costs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glm_numpy import ChatGLM2
from glm_numpy.checkpoint import CheckpointError, load_checkpoint
from glm_numpy.checkpoint.quantize import quantize_checkpoint
from glm_numpy.cli import main
from glm_numpy.quantize import quantize
from glm_numpy.testing import write_tiny_checkpoint

LAYER0 = "transformer.encoder.layers.0."
QKV = LAYER0 + "self_attention.query_key_value.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "fp32")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 1024, 24)


@pytest.fixture(scope="module")
def reference_logits(source, ids):
    return ChatGLM2.from_pretrained(source).forward(ids)  # [T, V] from the float32 weights


def test_int4_packs_even_columns_in_the_high_nibble():
    w = np.array([[6.125, -7.0, 0.875, -0.875]], np.float32)  # absmax 7: scale 1
    q = quantize(w, bits=4)
    assert q.q.dtype == np.int8 and q.q.shape == (1, 2)
    np.testing.assert_array_equal(q.integers(), [[6, -7, 1, -1]])
    np.testing.assert_array_equal(q.q.view(np.uint8), [[0x69, 0x1F]])  # 6 | -7, 1 | -1


@pytest.mark.parametrize("bits, group_size", [(8, None), (8, 16), (4, None), (4, 16)])
def test_dequantized_error_is_at_most_half_a_step(bits, group_size):
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    q = quantize(w, bits, group_size, scale_dtype="float32")
    steps = q.scale.reshape(8, -1).repeat(64 // q.scale.reshape(8, -1).shape[1], axis=1)
    assert np.all(np.abs(q.dequantize() - w) <= steps / 2 + 1e-6)


def test_groups_track_outliers_better_than_rows():
    w = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32)
    w[:, 0] *= 30  # one outlier column stretches every per-row scale
    per_row = np.abs(quantize(w, 4).dequantize() - w).mean()
    grouped = np.abs(quantize(w, 4, group_size=32).dequantize() - w).mean()
    assert grouped < per_row / 3


@pytest.mark.parametrize("bits, group_size, output_layer", [(8, None, False), (4, 32, True)])
def test_quantize_command_round_trip(source, tmp_path, bits, group_size, output_layer):
    argv = ["quantize", str(source), str(tmp_path / "q"), "--bits", str(bits)]
    argv += ["--group-size", str(group_size)] if group_size else []
    argv += ["--quantize-output-layer"] if output_layer else []
    assert main(argv) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_bit"] == bits
    assert config.get("quantization_group_size") == group_size
    assert config.get("quantization_output_layer", False) == output_layer
    original, written = load_checkpoint(source), load_checkpoint(tmp_path / "q")
    expected = quantize(original[QKV], bits, group_size)
    np.testing.assert_array_equal(written[QKV], expected.q)
    np.testing.assert_array_equal(written[QKV + "_scale"], expected.scale)
    assert written[QKV + "_scale"].dtype == np.float16
    for name in ("transformer.embedding.word_embeddings.weight", LAYER0 + "input_layernorm.weight"):
        np.testing.assert_array_equal(written[name], original[name])  # not quantised
    output = "transformer.output_layer.weight"
    assert (written[output].dtype == np.int8) == output_layer
    assert (output + "_scale" in written) == output_layer
    quantized_names = {n for n in written if n.endswith("_scale")}
    assert set(written) - quantized_names == set(original)  # the official names, plus scales


@pytest.mark.parametrize(
    "bits, group_size, min_cosine, min_top1",
    [(8, None, 0.999, 0.9), (8, 32, 0.999, 0.9), (4, None, 0.93, 0.5), (4, 32, 0.96, 0.5)],
)
def test_quantised_logits_stay_close_to_float32(
    source, tmp_path, ids, reference_logits, bits, group_size, min_cosine, min_top1
):
    model = ChatGLM2.from_pretrained(
        quantize_checkpoint(source, tmp_path / "q", bits, group_size, progress=False)
    )
    logits = model.forward(ids)  # [T, V]
    cosine = np.sum(logits * reference_logits, axis=-1) / (
        np.linalg.norm(logits, axis=-1) * np.linalg.norm(reference_logits, axis=-1)
    )
    top1 = np.mean(logits.argmax(-1) == reference_logits.argmax(-1))
    assert cosine.min() >= min_cosine
    assert top1 >= min_top1


def test_bad_quantize_requests_are_clear_errors(source, tmp_path):
    with pytest.raises(ValueError, match="expected 4 or 8"):
        quantize_checkpoint(source, tmp_path / "a", bits=3)
    with pytest.raises(ValueError, match="group_size=24 must divide"):
        quantize_checkpoint(source, tmp_path / "b", bits=4, group_size=24)
    with pytest.raises(CheckpointError, match="already exists"):
        quantize_checkpoint(source, source, bits=8)
    quantized = quantize_checkpoint(source, tmp_path / "c", bits=8, progress=False)
    with pytest.raises(ValueError, match="already quantised"):
        quantize_checkpoint(quantized, tmp_path / "d", bits=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_quantisation_math_imports_no_checkpoint_writer():
    """layers/linear.py uses QuantizedWeight; the math must not reach the commands that write
    checkpoints (the old quantize.py imported checkpoint/convert.py inside quantize_checkpoint,
    which imports synthetic.py, which imports quantize.py: a circle)."""
    import ast

    import glm_numpy.quantize

    tree = ast.parse(Path(glm_numpy.quantize.__file__).read_text(encoding="utf-8"))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    ]
    assert not [m for m in imported if m and m.startswith("glm_numpy.checkpoint")]
    code = (
        "import sys, glm_numpy.layers.linear\n"
        "writers = [m for m in sys.modules if m.startswith('glm_numpy.checkpoint.')\n"
        "           and m.rsplit('.', 1)[1] in ('writing', 'convert', 'quantize', 'synthetic')]\n"
        "assert not writers, writers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
