"""Each layer against a hand-written torch reference (tests/torch_reference.py), plus the
properties that define it. Tolerances: float32 math against float64 references, so 1e-5
absolute on O(1) values unless stated."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_reference as ref
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy.dtypes import from_float32, to_float32
from glm_numpy.layers import (
    apply_rotary,
    attention,
    attention_probs,
    causal_mask,
    embedding,
    linear,
    lm_head,
    rms_norm,
    rotary_table,
    swiglu,
)

STORAGE = ["float32", "float16", "bfloat16"]


def rng_for(seed):
    return np.random.default_rng(seed)


def stored(values, dtype):
    """float32 values -> (stored array, the float32 values it really holds)."""
    array = from_float32(values, dtype)
    return array, to_float32(array)


# --- embedding ---------------------------------------------------------------------------
@given(st.integers(1, 12), st.sampled_from(STORAGE), st.integers(0, 2**16))
def test_embedding_matches_torch(T, dtype, seed):
    rng = rng_for(seed)
    table, exact = stored(rng.normal(size=(50, 8)).astype(np.float32), dtype)
    ids = rng.integers(0, 50, T)
    expected = F.embedding(torch.from_numpy(ids), torch.from_numpy(exact)).numpy()
    got = embedding(ids, table)
    assert got.shape == (T, 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # a lookup: bit-exact


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match="token id 7 is outside"):
        embedding(np.array([1, 7]), np.zeros((7, 4), np.float32))
    with pytest.raises(TypeError, match="integers"):
        embedding(np.array([1.0]), np.zeros((7, 4), np.float32))


# --- RMSNorm -----------------------------------------------------------------------------
@given(st.integers(1, 6), st.integers(1, 40), st.sampled_from(STORAGE), st.integers(0, 2**16))
def test_rms_norm_matches_torch(T, D, dtype, seed):
    rng = rng_for(seed)
    x = (rng.normal(size=(T, D)) * rng.uniform(0.01, 100)).astype(np.float32)
    weight, exact_weight = stored(rng.normal(size=D).astype(np.float32), dtype)
    expected = ref.rms_norm(torch.from_numpy(x), torch.from_numpy(exact_weight), 1e-5).numpy()
    got = rms_norm(x, weight, 1e-5)
    assert got.shape == (T, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@given(st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_rms_norm_is_scale_invariant(c, seed):
    x = rng_for(seed).normal(size=(3, 16)).astype(np.float32)
    w = np.ones(16, np.float32)
    # eps = 0 makes the invariance exact; with eps it holds only while mean(x^2) >> eps
    np.testing.assert_allclose(rms_norm(np.float32(c) * x, w, 0.0), rms_norm(x, w, 0.0), rtol=1e-4)


def test_rms_norm_eps_is_inside_the_root():
    x = np.full((1, 4), 0.01, np.float32)
    got = rms_norm(x, np.ones(4, np.float32), 1e-4)
    np.testing.assert_allclose(got, 0.01 / np.sqrt(1e-4 + 1e-4), rtol=1e-6)


# --- rotary ------------------------------------------------------------------------------
@given(
    st.integers(1, 6),
    st.integers(1, 4),
    st.sampled_from([4, 8, 16, 32, 128]),
    st.integers(0, 32767),
    st.integers(0, 2**16),
)
def test_rotary_matches_torch(T, N, Dh, first_position, seed):
    x = rng_for(seed).normal(size=(T, N, Dh)).astype(np.float32)
    positions = np.minimum(first_position + np.arange(T), 32767)
    cos, sin = rotary_table(positions, Dh // 2)
    got = apply_rotary(x, cos, sin)
    expected = ref.rotary(torch.from_numpy(x), torch.from_numpy(positions)).numpy()
    assert got.shape == (T, N, Dh) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


@given(st.integers(0, 32767), st.integers(0, 2**16))
def test_rotary_keeps_norms_and_the_second_half(position, seed):
    x = rng_for(seed).normal(size=(1, 3, 16)).astype(np.float32)
    cos, sin = rotary_table(np.array([position]), 8)
    y = apply_rotary(x, cos, sin)
    np.testing.assert_array_equal(y[..., 8:], x[..., 8:])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # and each interleaved pair keeps its own length: pairs are (2i, 2i+1), not (i, i + R/2)
    pair_norm = np.hypot(y[..., 0:8:2], y[..., 1:8:2])
    np.testing.assert_allclose(pair_norm, np.hypot(x[..., 0:8:2], x[..., 1:8:2]), rtol=1e-5)


@given(st.integers(0, 30000), st.integers(0, 30000), st.integers(1, 500), st.integers(0, 2**16))
def test_rotary_dot_product_depends_only_on_distance(p, r, distance, seed):
    q, k = rng_for(seed).normal(size=(2, 1, 1, 32)).astype(np.float32)

    def score(pq, pk):
        cq, sq = rotary_table(np.array([pq]), 16)
        ck, sk = rotary_table(np.array([pk]), 16)
        return float(np.sum(apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)))

    np.testing.assert_allclose(score(p + distance, p), score(r + distance, r), atol=2e-4)


def test_reference_fp16_table_equals_torch_half_precision_recipe():
    positions = np.arange(32768)
    for R in (16, 64):
        cos, sin = rotary_table(positions, R, reference_fp16=True)
        torch_cos, torch_sin = ref.fp16_rotary_table(torch.from_numpy(positions), R)
        np.testing.assert_array_equal(cos, torch_cos.numpy())
        np.testing.assert_array_equal(sin, torch_sin.numpy())
    # and it really differs from the exact table at long positions (spec §8.1)
    exact_cos, _ = rotary_table(np.array([8000]), 64)
    fp16_cos, _ = rotary_table(np.array([8000]), 64, reference_fp16=True)
    assert np.abs(exact_cos - fp16_cos).max() > 0.1


# --- attention ---------------------------------------------------------------------------
@st.composite
def attention_shapes(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    H = G * draw(st.sampled_from([1, 2, 3, 8]))
    T = draw(st.integers(1, 7))
    S = T + draw(st.integers(0, 9))
    Dh = draw(st.sampled_from([4, 8, 16, 128]))
    return T, S, H, G, Dh


@given(attention_shapes(), st.floats(0.1, 30.0), st.integers(0, 2**16))
def test_attention_matches_torch_sdpa(shapes, spread, seed):
    T, S, H, G, Dh = shapes
    rng = rng_for(seed)
    q = (rng.normal(size=(T, H, Dh)) * spread).astype(np.float32)
    k, v = rng.normal(size=(2, S, G, Dh)).astype(np.float32)
    got = attention(q, k, v)
    expected = ref.grouped_attention(*(torch.from_numpy(a) for a in (q, k, v))).numpy()
    assert got.shape == (T, H, Dh) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-5 * max(1.0, spread))


def test_attention_is_stable_for_huge_scores():
    q = np.full((2, 2, 4), 1e4, np.float32)
    k = np.full((2, 1, 4), 1e4, np.float32)
    v = np.arange(8, dtype=np.float32).reshape(2, 1, 4)
    out = attention(q, k, v)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 0], v[0, 0])  # the first query sees only the first key


@given(attention_shapes(), st.integers(0, 2**16))
def test_attention_with_one_group_per_head_is_plain_multi_head(shapes, seed):
    T, S, H, _, Dh = shapes
    rng = rng_for(seed)
    q, k, v = (rng.normal(size=(n, H, Dh)).astype(np.float32) for n in (T, S, S))
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)
    scores = np.where(causal_mask(T, S), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(attention(q, k, v), np.einsum("hts,shd->thd", probs, v), atol=1e-5)


def test_heads_read_their_groups_in_blocks():
    # 4 heads, 2 groups: heads 0-1 -> group 0, heads 2-3 -> group 1 (not round-robin)
    q = np.zeros((1, 4, 4), np.float32)
    k = np.zeros((1, 2, 4), np.float32)
    v = np.stack([np.zeros(4), np.ones(4)])[None].astype(np.float32)  # [S=1, G=2, Dh=4]
    out = attention(q, k, v)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1])


@given(st.integers(2, 8), st.integers(0, 2**16))
def test_attention_is_causal(T, seed):
    rng = rng_for(seed)
    q, k, v = (rng.normal(size=(T, 2, 8)).astype(np.float32) for _ in range(3))
    changed = T // 2
    k2, v2 = k.copy(), v.copy()
    k2[changed] += 5
    v2[changed] -= 5
    before = attention(q, k, v)[:changed]
    np.testing.assert_array_equal(attention(q, k2, v2)[:changed], before)
    probs = attention_probs(q, k)
    assert np.all(probs[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)


# --- SwiGLU, lm_head, linear -------------------------------------------------------------
@given(st.integers(1, 5), st.integers(1, 24), st.integers(1, 24), st.sampled_from(STORAGE))
def test_swiglu_matches_torch(T, D, Fh, dtype):
    rng = rng_for(T * 1000 + D * 10 + Fh)
    x = rng.normal(size=(T, D)).astype(np.float32)
    w1, w1_exact = stored(rng.normal(size=(2 * Fh, D)).astype(np.float32), dtype)
    w2, w2_exact = stored(rng.normal(size=(D, Fh)).astype(np.float32), dtype)
    expected = ref.swiglu(*(torch.from_numpy(a) for a in (x, w1_exact, w2_exact))).numpy()
    got = swiglu(x, w1, w2)
    assert got.shape == (T, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_swiglu_gates_with_the_first_half():
    # gate = first half: an enormous negative gate silences the output whatever "up" holds
    w1 = np.array([[-100.0], [1.0]], np.float32)  # [2F=2, D=1]: gate row, then up row
    w2 = np.ones((1, 1), np.float32)
    assert abs(swiglu(np.ones((1, 1), np.float32), w1, w2)[0, 0]) < 1e-30


@given(st.integers(1, 6), st.sampled_from(STORAGE), st.booleans())
def test_lm_head_matches_torch(T, dtype, last_only):
    rng = rng_for(T)
    x = rng.normal(size=(T, 16)).astype(np.float32)
    w, w_exact = stored(rng.normal(size=(40, 16)).astype(np.float32), dtype)
    expected = F.linear(torch.from_numpy(x), torch.from_numpy(w_exact)).numpy()
    got = lm_head(x, w, last_only=last_only)
    np.testing.assert_allclose(got, expected[-1:] if last_only else expected, rtol=1e-5, atol=1e-5)


def test_linear_adds_the_bias_after_the_product():
    w = np.eye(3, dtype=np.float16)
    got = linear(np.ones((2, 3), np.float32), w, np.array([1, 2, 3], np.float16))
    np.testing.assert_array_equal(got, [[2, 3, 4], [2, 3, 4]])
