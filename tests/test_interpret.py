"""glm_numpy.interpret and its commands on the embedded default model: the logit lens, head
ablation, activation patching, first divergence."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer
from glm_numpy.assets import default_model_path
from glm_numpy.cli import main
from glm_numpy.interpret import ablate_heads, first_divergence, logit_lens, patch

LAYER = "transformer.encoder.layers.3."


@pytest.fixture(scope="module")
def model():
    return ChatGLM2.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return ChatGLM2Tokenizer.from_pretrained(default_model_path())


def with_layer_3_changed(model, tensor: str) -> ChatGLM2:
    """The same model but for one tensor of layer 3, scaled by 1.1."""
    weights = dict(model.weights)
    weights[LAYER + tensor] = (weights[LAYER + tensor] * 1.1).astype(weights[LAYER + tensor].dtype)
    return ChatGLM2(model.config, weights)


@pytest.mark.parametrize(
    "tensor, first",
    [
        ("input_layernorm.weight", "layers.3.input_layernorm"),
        ("self_attention.dense.weight", "layers.3.attention.output"),
        ("mlp.dense_4h_to_h.weight", "layers.3.mlp_output"),
    ],
)
def test_first_divergence_names_the_one_layer_whose_weights_differ(model, tensor, first):
    ids = np.arange(20, 30)
    _, trace_a = model.forward(ids, trace=True)
    _, trace_b = with_layer_3_changed(model, tensor).forward(ids, trace=True)
    divergence = first_divergence(trace_a, trace_b)
    assert divergence.name == first
    index = divergence.index
    assert (
        divergence.value_a == trace_a[first][index] and divergence.value_b == trace_b[first][index]
    )
    stages = dict(divergence.layers)
    assert [stages[s] for s in ("embedding", "layers.0", "layers.1", "layers.2")] == [0] * 4
    assert 0 < stages["layers.3"] <= stages["final"] * 10


def test_first_divergence_of_identical_runs_is_none(model):
    ids = np.arange(5, 12)
    _, trace_a = model.forward(ids, trace=True)
    _, trace_b = model.forward(ids, trace=True)
    assert first_divergence(trace_a, trace_b) is None


def test_first_divergence_finds_the_worst_element_beyond_tolerance():
    a = {"x": np.array([1.0, 2.0, 3.0]), "y": np.array([[1.0, 100.0], [10.0, 1.0]])}
    within = {"x": a["x"] * (1 + 5e-4), "y": a["y"]}
    assert first_divergence(a, within) is None  # rtol 1e-3
    beyond = {"x": a["x"], "y": np.array([[1.01, 100.5], [10.0, 1.0]])}
    found = first_divergence(a, beyond)
    assert (found.name, found.index) == ("y", (0, 0))  # 1% beyond beats 0.5%
    assert found.relative_error == pytest.approx(0.01)
    assert first_divergence(a, {"x": a["x"], "y": a["y"] + np.nan}).name == "y"
    with pytest.raises(ValueError, match="trace_b has no 'y'"):
        first_divergence(a, {"x": a["x"]})


def test_the_logit_lens_ends_with_the_models_own_prediction(model, tokenizer):
    text = "床前明月光，疑是地上"
    lens = logit_lens(model, tokenizer, text, top_k=3)
    L = model.config.num_layers
    assert lens.stages == ["embedding"] + [f"layers.{i}" for i in range(L)]
    ids = tokenizer.encode(text)
    assert lens.top_ids.shape == lens.top_probs.shape == (L + 1, len(ids), 3)
    logits = model.forward(np.array(ids))[:, : tokenizer.vocab_size]
    np.testing.assert_array_equal(lens.top_ids[-1, :, 0], logits.argmax(axis=-1))
    assert (np.diff(lens.top_probs, axis=-1) <= 0).all()
    assert lens.top_tokens[-1][-1][0] == tokenizer.pieces([logits[-1].argmax()])[0]
    table = lens.format()
    assert len(table.splitlines()) == L + 2 and "layers.5" in table


def test_ablating_no_heads_changes_nothing_and_bad_heads_are_errors(model):
    ids = np.arange(3, 9)
    np.testing.assert_allclose(ablate_heads(model, ids, {}), model.forward(ids), atol=1e-5)
    assert not np.allclose(ablate_heads(model, ids, {2: [0, 7]}), model.forward(ids), atol=1e-4)
    with pytest.raises(ValueError, match="layer 6: this model has layers 0..5"):
        ablate_heads(model, ids, {6: [0]})
    with pytest.raises(ValueError, match="layer 1: no head 8"):
        ablate_heads(model, ids, {1: [8]})


def test_patching_the_changed_token_restores_the_clean_run(model, tokenizer):
    clean = tokenizer.encode("春眠不覺曉")
    corrupt = tokenizer.encode("春眠不知曉")  # the same length: one token differs
    changed = [t for t in range(len(clean)) if clean[t] != corrupt[t]]
    answer, foil = tokenizer.encode("，", add_special_tokens=False)[-1], 13
    result = patch(model, clean, corrupt, "embedding", answer, foil)
    assert result.points == ["embedding"] and result.clean != result.corrupt
    np.testing.assert_allclose(result.recovered[0, changed], 1, atol=1e-4)
    others = [t for t in range(len(clean)) if t not in changed]
    assert np.all(result.recovered[0, others] == 0)  # the same tokens: the same activations
    stream = patch(model, clean, corrupt, "layers.*.output", answer, foil)
    assert stream.points == [f"layers.{i}.output" for i in range(6)]
    np.testing.assert_allclose(stream.recovered[-1, -1], 1, atol=1e-4)  # the last stream: all


def test_patching_needs_equal_lengths_and_a_known_point(model):
    with pytest.raises(ValueError, match="same length"):
        patch(model, [1, 2, 3], [1, 2], "embedding", 5, 6)
    with pytest.raises(ValueError, match="did you mean 'layers.1.output'"):
        patch(model, [1, 2], [1, 3], "layers.1.outptu", 5, 6)


def test_diff_command_names_the_broken_layer(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(default_model_path(), broken)
    weights = load_file(broken / "model.safetensors")
    weights[LAYER + "mlp.dense_h_to_4h.weight"] *= 2
    save_file(weights, broken / "model.safetensors")
    code = main(["diff", "--model", str(default_model_path()), "--model", str(broken), "春眠"])
    out = capsys.readouterr().out
    assert code == 0
    assert "first divergence: layers.3.mlp_gate[" in out
    table = {line.split()[0]: line.split()[1] for line in out.splitlines()[-8:]}
    assert table["layers.2"] == "0.000e+00" and float(table["layers.3"]) > 0.01


def test_diff_and_lens_commands_reject_bad_input(capsys):
    default = str(default_model_path())
    assert main(["diff", "--model", default, "hi"]) == 2
    assert "exactly two models" in capsys.readouterr().err
    assert main(["lens", "--position", "40", "hi"]) == 2
    assert "--position 40: the prompt has 4 tokens" in capsys.readouterr().err
    assert main(["lens", "--top-k", "0", "hi"]) == 2


def test_lens_command_prints_one_row_per_stage(capsys):
    assert main(["lens", "--top-k", "2", "床前明月光"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("next-token predictions after token") and len(rows) == 8
