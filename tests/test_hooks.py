"""Hooks: watch or replace any intermediate of the forward pass by its trace name."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import glm_oracle

from glm_numpy import ChatGLM2
from glm_numpy.generation import GenerationConfig, generate, generate_batch
from glm_numpy.hooks import IN_EACH_LAYER, hook_points, matching_points
from glm_numpy.interpret import ablate_heads
from glm_numpy.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def random_ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.padded_vocab_size, n)


def zero_head(head: int, head_dim: int):
    """A hook on attention.context [T, H·Dh] that removes one head's contribution."""

    def hook(context):
        context = context.copy()
        context[:, head * head_dim : (head + 1) * head_dim] = 0
        return context

    return hook


def test_the_trace_keeps_what_the_hooks_see_at_every_point(model):
    seen = {}

    def watcher(name):
        return lambda array: seen.__setitem__(name, array.copy())

    points = hook_points(model.config.num_layers)
    logits, trace = model.forward(
        random_ids(model, 5), trace=True, hooks={p: watcher(p) for p in points}
    )
    assert list(trace) == list(points) == list(seen)
    for name in points:
        np.testing.assert_array_equal(trace[name], seen[name])


def test_a_replacement_is_what_the_rest_of_the_pass_uses(model):
    ids = random_ids(model, 4)
    _, plain = model.forward(ids, trace=True)
    doubled_output = lambda out: 2 * out  # noqa: E731
    logits, trace = model.forward(ids, trace=True, hooks={"layers.0.output": doubled_output})
    np.testing.assert_array_equal(trace["layers.0.output"], 2 * plain["layers.0.output"])
    np.testing.assert_array_equal(trace["layers.1.input"], trace["layers.0.output"])
    assert not np.allclose(logits, plain["logits"])
    np.testing.assert_array_equal(trace["embedding"], plain["embedding"])  # earlier: untouched


def test_replacing_every_layers_output_by_its_input_skips_the_layers(model):
    ids = random_ids(model, 3)
    inputs = {}
    hooks = {}
    for i in range(model.config.num_layers):
        hooks[f"layers.{i}.input"] = lambda x, i=i: inputs.__setitem__(i, x)
        hooks[f"layers.{i}.output"] = lambda out, i=i: inputs[i]
    _, trace = model.forward(ids, trace=True, hooks=hooks)
    last = f"layers.{model.config.num_layers - 1}.output"
    np.testing.assert_array_equal(trace[last], trace["embedding"])


def test_wildcards_reach_every_layer(model):
    called = []
    model.forward(random_ids(model, 3), hooks={"layers.*.attention.context": called.append})
    assert len(called) == model.config.num_layers
    c = model.config
    assert all(a.shape == (3, c.num_attention_heads * c.head_dim) for a in called)


def test_a_star_stays_within_one_part_of_a_name_and_two_stars_do_not():
    assert matching_points("layers.*.output", 3) == [
        "layers.0.output",
        "layers.1.output",
        "layers.2.output",
    ]
    assert matching_points("layers.1.**", 3) == [f"layers.1.{p}" for p in IN_EACH_LAYER]
    assert matching_points("layers.?.attention.*", 12)[:2] == [
        "layers.0.attention.q",
        "layers.0.attention.k",
    ]
    assert len(matching_points("**", 2)) == len(hook_points(2)) == 4 + 2 * len(IN_EACH_LAYER)


@pytest.mark.parametrize(
    "name, match",
    [
        ("layers.0.mlp_actt", "did you mean 'layers.0.mlp_act'"),
        ("layers.0.attention.prob", "did you mean 'layers.0.attention.probs'"),
        ("layers.9.output", "names no hook point of this 2-layer model"),
        ("layers.*.attn.context", "names no hook point"),
    ],
)
def test_unknown_hook_names_are_errors_with_near_matches(model, name, match):
    with pytest.raises(ValueError, match=match):
        model.forward(random_ids(model, 2), hooks={name: lambda a: None})


def test_bad_hooks_get_clear_errors(model):
    with pytest.raises(TypeError, match="hooks must be a dict"):
        model.forward(random_ids(model, 2), hooks=[print])
    with pytest.raises(TypeError, match="'logits': expected a function"):
        model.forward(random_ids(model, 2), hooks={"logits": 3})
    with pytest.raises(ValueError, match=r"'embedding' returned shape \(2, 3\)"):
        model.forward(random_ids(model, 2), hooks={"embedding": lambda x: np.zeros((2, 3))})


@given(st.integers(1, 8), st.integers(1, 4), st.integers(0, 3), st.integers(0, 2**16))
def test_hooks_compose_with_the_cache(model, n, m, head, seed):
    """A head removed during prefill and every decode step == removed on a full recompute."""
    ids = random_ids(model, n + m, seed)
    hooks = {"layers.1.attention.context": zero_head(head, model.config.head_dim)}
    full = model.forward(ids, hooks=hooks)
    cache = model.new_cache()
    steps = [model.forward(ids[:n], cache=cache, hooks=hooks)]
    steps += [model.forward(ids[t : t + 1], cache=cache, hooks=hooks) for t in range(n, n + m)]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-5, rtol=0)
    assert not np.allclose(full, model.forward(ids), atol=1e-5)


def test_hooked_keys_are_what_the_cache_keeps(model):
    cache = model.new_cache()
    model.forward(random_ids(model, 3), cache=cache, hooks={"layers.0.attention.k_rotary": np.abs})
    assert (cache.keys(0) >= 0).all() and not (cache.keys(1) >= 0).all()


def forcing(token):
    """A hook on the logits that makes `token` the most likely id everywhere."""

    def hook(logits):
        forced = np.zeros_like(logits)
        forced[:, token] = 1.0
        return forced

    return hook


def test_generation_runs_every_step_through_the_hooks(model):
    greedy = GenerationConfig(do_sample=False, max_new_tokens=5)
    assert generate(model, [5, 6, 7], greedy, hooks={"logits": forcing(42)}) == [42] * 5
    rows = generate_batch(model, [[5, 6, 7], [9]], greedy, hooks={"logits": forcing(17)})
    assert rows == [[17] * 5, [17] * 5]


def test_batch_hooks_see_each_row_as_forward_does(model):
    rows = [random_ids(model, 5, seed=1), random_ids(model, 3, seed=2)]
    ids = np.zeros((2, 5), np.int64)
    mask = np.zeros((2, 5), np.int64)
    for b, r in enumerate(rows):
        ids[b, 5 - len(r) :], mask[b, 5 - len(r) :] = r, 1
    hooks = {"layers.0.attention.context": zero_head(2, model.config.head_dim)}
    batch = model.forward_batch(ids, mask, [model.new_cache() for _ in rows], hooks=hooks)
    for b, r in enumerate(rows):
        alone = model.forward(r, hooks=hooks)
        np.testing.assert_allclose(batch[b, 5 - len(r) :], alone, atol=1e-5)


def test_without_hooks_the_fused_kernels_run(model, monkeypatch):
    """The fast path is untouched: the readable attention is never called without hooks."""
    import glm_numpy.model as model_module

    def readable_attention_called(*args):
        raise AssertionError("the readable attention ran in a pass without hooks")

    monkeypatch.setattr(model_module, "attention_scores", readable_attention_called)
    if not model_module.kernels.usable():
        pytest.skip("numba kernels are not usable in this process")
    model.forward(random_ids(model, 4))
    with pytest.raises(AssertionError, match="readable attention"):
        model.forward(random_ids(model, 4), hooks={"logits": lambda x: None})


@pytest.mark.parametrize("layer, heads", [(0, [1]), (1, [0, 3])])
def test_zeroing_heads_matches_the_oracle_with_o_proj_inputs_zeroed(model, layer, heads):
    """Our context [T, H·Dh] is the input of torch's o_proj: zero the same slices in both."""
    Dh = model.config.head_dim
    ids = random_ids(model, 12, seed=3)

    def zero_heads(context):  # [..., H·Dh]
        context = context.clone()
        for h in heads:
            context[..., h * Dh : (h + 1) * Dh] = 0
        return context

    ours = ablate_heads(model, ids, {layer: heads})  # a hook on layers.{layer}.attention.context
    oracle = glm_oracle(model.config, model.weights)
    o_proj = oracle.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: (zero_heads(args[0]),))
    with torch.no_grad():
        theirs = oracle(torch.from_numpy(ids)[None]).logits[0].numpy()
    handle.remove()
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-5
    assert not np.allclose(ours, model.forward(ids), atol=1e-4)  # the heads did matter
