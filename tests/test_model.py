"""The composed model: KV cache == full recomputation, causality, positions, batches, trace."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy import ChatGLM2
from glm_numpy.testing import write_tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def random_ids(model, n, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.padded_vocab_size, n)


@given(st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**16))
def test_prefill_then_decode_equals_one_forward(model, n, m, seed):
    ids = random_ids(model, n + m, seed)
    full = model.forward(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:n], cache=cache)]
    steps += [model.forward(ids[t : t + 1], cache=cache) for t in range(n, n + m)]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-5, rtol=0)
    assert cache.length == n + m and cache.next_position == n + m


def test_cache_layout(model):
    c = model.config
    cache = model.new_cache()
    model.forward(random_ids(model, 5), cache=cache)
    for layer in range(c.num_layers):
        assert cache.keys(layer).shape == (5, c.num_kv_groups, c.head_dim)
        assert cache.values(layer).shape == (5, c.num_kv_groups, c.head_dim)
    assert cache.nbytes == 2 * c.num_layers * 5 * c.num_kv_groups * c.head_dim * 4


def test_cached_keys_are_stored_after_rotary(model):
    cache = model.new_cache()
    _, trace = model.forward(random_ids(model, 4), cache=cache, trace=True)
    np.testing.assert_array_equal(cache.keys(0), trace["layers.0.attention.k_rotary"])
    np.testing.assert_array_equal(cache.values(0), trace["layers.0.attention.v"])


@given(st.integers(2, 10), st.integers(0, 2**16))
def test_changing_a_token_never_changes_earlier_outputs(model, T, seed):
    ids = random_ids(model, T, seed)
    changed = ids.copy()
    t = T // 2
    changed[t] = (changed[t] + 1) % model.config.padded_vocab_size
    np.testing.assert_array_equal(model.forward(changed)[:t], model.forward(ids)[:t])


def test_trace_lists_every_intermediate_in_order(model):
    c = model.config
    ids = random_ids(model, 6)
    logits, trace = model.forward(ids, trace=True)
    names = list(trace)
    assert names[:2] == ["positions", "embedding"] and names[-2:] == ["final_layernorm", "logits"]
    T, H, G, Dh = 6, c.num_attention_heads, c.num_kv_groups, c.head_dim
    expected = {
        "layers.0.input_layernorm": (T, c.hidden_size),
        "layers.0.attention.q": (T, H, Dh),
        "layers.0.attention.k": (T, G, Dh),
        "layers.0.attention.v": (T, G, Dh),
        "layers.0.attention.scores": (H, T, T),
        "layers.0.attention.probs": (H, T, T),
        "layers.0.attention.context": (T, H * Dh),
        "layers.0.residual_attention": (T, c.hidden_size),
        "layers.0.mlp_gate": (T, c.ffn_hidden_size),
        "layers.0.mlp_up": (T, c.ffn_hidden_size),
        f"layers.{c.num_layers - 1}.output": (T, c.hidden_size),
        "logits": (T, c.padded_vocab_size),
    }
    for name, shape in expected.items():
        assert trace[name].shape == shape, name
    np.testing.assert_array_equal(trace["logits"], logits)
    np.testing.assert_array_equal(trace["positions"], np.arange(T))


def test_positions_continue_from_the_cache(model):
    cache = model.new_cache()
    model.forward(random_ids(model, 3), cache=cache)
    _, trace = model.forward(random_ids(model, 2, seed=1), cache=cache, trace=True)
    np.testing.assert_array_equal(trace["positions"], [3, 4])
    assert trace["layers.0.attention.probs"].shape[-1] == 5


def test_last_only_projects_just_the_last_position(model):
    ids = random_ids(model, 7)
    last = model.forward(ids, last_only=True)
    np.testing.assert_allclose(last, model.forward(ids)[-1:], atol=1e-5)  # BLAS blocking differs


def test_left_padded_batch_rows_equal_single_sequences(model):
    rows = [random_ids(model, 5, seed=1), random_ids(model, 3, seed=2)]
    width = max(len(r) for r in rows)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = r
        mask[b, width - len(r) :] = 1
    caches = [model.new_cache() for _ in rows]
    batch = model.forward_batch(ids, mask, caches)
    nxt = np.array([[11], [12]])
    step = model.forward_batch(nxt, np.ones((2, 1)), caches)
    for b, r in enumerate(rows):
        alone = model.forward(np.append(r, nxt[b]))
        np.testing.assert_allclose(batch[b, width - len(r) :], alone[:-1], atol=1e-5)
        np.testing.assert_allclose(step[b, 0], alone[-1], atol=1e-5)


def test_reference_fp16_rotary_changes_only_the_angle_table(tmp_path):
    directory = write_tiny_checkpoint(tmp_path)
    exact = ChatGLM2.from_pretrained(directory)
    fp16 = ChatGLM2.from_pretrained(directory, reference_fp16_rotary=True)
    ids = random_ids(exact, 8)
    # positions 0..7: fp16 angles differ only by rounding, so the logits stay close
    np.testing.assert_allclose(fp16.forward(ids), exact.forward(ids), atol=5e-2)
    assert not np.array_equal(fp16.forward(ids), exact.forward(ids))


def test_bad_input_ids_get_clear_errors(model):
    with pytest.raises(ValueError, match="1-D"):
        model.forward(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        model.forward(np.array([], np.int64))
    with pytest.raises(IndexError, match="outside the embedding"):
        model.forward(np.array([model.config.padded_vocab_size]))


def test_standalone_block_is_the_models_block(model):
    from glm_numpy.model import block, layer_weights

    ids = random_ids(model, 6)
    _, trace = model.forward(ids, trace=True)
    short_names = {
        name.removeprefix("transformer.encoder.layers.1."): array
        for name, array in model.weights.items()
        if name.startswith("transformer.encoder.layers.1.")
    }
    out = block(trace["layers.1.input"], layer_weights(short_names), model.config)
    np.testing.assert_allclose(out, trace["layers.1.output"], atol=1e-6)
