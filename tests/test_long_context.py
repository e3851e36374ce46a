"""Long context (issue 16): the tiled attention kernel against the readable layers, chunked
prefill against one pass and against the oracle at 4K+ tokens, 16-bit KV caches, memory that
does not grow with the prompt, and clear errors at the limits."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glm_numpy import ChatGLM2
from glm_numpy.cache import KVCache
from glm_numpy.cli import main
from glm_numpy.dtypes import from_float32, to_float32
from glm_numpy.generation import GenerationConfig, generate, generate_batch
from glm_numpy.kernels import attention as kernel
from glm_numpy.layers.attention import attention
from glm_numpy.model import attention_allowed
from glm_numpy.testing import write_tiny_checkpoint

EXACT = 1e-5  # relative to the largest output: fp32 sums in another order


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.fixture(params=["small tiles", "default tiles"])
def tiles(request, monkeypatch):
    """Small tiles put many key blocks and query blocks into small problems."""
    if request.param == "small tiles":
        monkeypatch.setattr(kernel, "TILE_SCORES", 256)
        monkeypatch.setattr(kernel, "TILE_ROWS", 8)
    return request.param


def model_mask(cached: int, padding: int, T: int, padding_cached: bool) -> tuple[np.ndarray, int]:
    """The model's allowed [T, S] mask: `cached` slots already in the cache, then T new ones;
    `padding` slots of left padding at the start (in the cache or among the new slots, as
    forward_batch makes them)."""
    cache = KVCache(1, 1, 1)
    if padding_cached:
        cache.extend(np.arange(cached + padding) >= padding)
        slots = cache.extend(np.ones(T, dtype=bool))
    else:
        cache.extend(np.ones(cached, dtype=bool))
        slots = cache.extend(np.arange(T) >= padding)
    return attention_allowed(cache, slots), cache.length


def attention_case(seed, T, cached, padding, H, G, padding_cached=True, scale=3.0):
    allowed, S = model_mask(cached, padding, T, padding_cached)
    rng = np.random.default_rng(seed)
    q = (scale * rng.standard_normal((T, H, 16))).astype(np.float32)
    keys, values = rng.standard_normal((2, S, G, 16)).astype(np.float32)
    return q, keys, values, allowed


@given(
    T=st.integers(1, 40),
    cached=st.integers(0, 60),
    padding=st.integers(0, 5),
    padding_cached=st.booleans(),
    heads=st.sampled_from([(1, 1), (4, 1), (4, 2), (6, 3), (8, 2), (4, 4)]),
    seed=st.integers(0, 2**16),
)
def test_tiled_attention_matches_the_layers(T, cached, padding, padding_cached, heads, seed):
    padding = min(padding, T - 1) if not padding_cached else padding
    q, keys, values, allowed = attention_case(seed, T, cached, padding, *heads, padding_cached)
    for tile_scores, tile_rows in [(256, 8), (kernel.TILE_SCORES, kernel.TILE_ROWS)]:
        original = kernel.TILE_SCORES, kernel.TILE_ROWS
        kernel.TILE_SCORES, kernel.TILE_ROWS = tile_scores, tile_rows
        try:
            ours = kernel.tiled_attention(q, keys, values, allowed)
        finally:
            kernel.TILE_SCORES, kernel.TILE_ROWS = original
        assert relative_difference(ours, attention(q, keys, values, allowed)) <= EXACT


@pytest.mark.parametrize(
    "T, cached", [(1, 4999), (1, 16), (16, 2000), (40, 0), (300, 500), (777, 0)]
)
def test_attention_context_matches_the_layers(tiles, T, cached):
    """Decode over a long cache (heads in lanes), a small prompt (the direct kernel), prefill
    chunks after a cache, a whole causal prompt."""
    q, keys, values, allowed = attention_case(T + cached, T, cached, 3, 8, 2)
    ours = kernel.attention_context(q, keys, values, allowed)
    assert relative_difference(ours, attention(q, keys, values, allowed)) <= EXACT


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("T, cached", [(1, 3000), (200, 300), (2, 5)])
def test_16_bit_keys_and_values_are_widened_exactly(tiles, dtype, T, cached):
    """A 16-bit cache gives the attention of its (rounded) values, to float32 accuracy."""
    q, keys, values, allowed = attention_case(T, T, cached, 2, 8, 2)
    keys16, values16 = from_float32(keys, dtype), from_float32(values, dtype)
    ours = kernel.attention_context(q, keys16, values16, allowed)
    reference = attention(q, to_float32(keys16), to_float32(values16), allowed)
    assert relative_difference(ours, reference) <= EXACT


@given(
    T=st.integers(1, 2),
    cached=st.integers(0, 1500),
    padding=st.integers(0, 40),
    heads=st.sampled_from([(32, 2), (8, 2), (4, 1), (40, 2), (6, 3), (16, 16)]),
    Dh=st.sampled_from([16, 20, 128]),
    split=st.sampled_from([kernel.DECODE_SPLIT, 100]),
    holes=st.booleans(),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_decode_attention_matches_the_layers(
    T, cached, padding, heads, Dh, split, holes, dtype, seed
):
    """Heads in lanes for any r = H/G (16-lane chunks, the last one padded), ragged key blocks
    and splits (many of them with split=100), left padding and masks with holes, 16-bit caches
    against their widened values."""
    allowed, S = model_mask(cached, padding, T, padding_cached=True)
    rng = np.random.default_rng(seed)
    if holes:
        allowed &= rng.random(S) < 0.7
        allowed[np.arange(T), np.arange(S - T, S)] = True  # each query sees itself
    H, G = heads
    q = (3.0 * rng.standard_normal((T, H, Dh))).astype(np.float32)
    keys, values = from_float32(rng.standard_normal((2, S, G, Dh)).astype(np.float32), dtype)
    original = kernel.DECODE_SPLIT
    kernel.DECODE_SPLIT = split
    try:
        ours = kernel.decode_attention(q, keys, values, allowed)
    finally:
        kernel.DECODE_SPLIT = original
    reference = attention(q, to_float32(keys), to_float32(values), allowed)
    assert relative_difference(ours, reference) <= EXACT


def test_decode_attention_reads_the_caches_layout():
    """The model's cache is [G, capacity, Dh] seen as a [S, G, Dh] view (rows of a group
    contiguous, groups apart): the kernel follows the strides."""
    rng = np.random.default_rng(5)
    stored = rng.standard_normal((2, 2, 3000, 128)).astype(np.float32)  # K/V, G, capacity, Dh
    keys, values = stored[0, :, :2500].swapaxes(0, 1), stored[1, :, :2500].swapaxes(0, 1)
    q = rng.standard_normal((1, 32, 128)).astype(np.float32)
    allowed = np.arange(2500)[None] >= 7
    ours = kernel.attention_context(q, keys, values, allowed)
    assert relative_difference(ours, attention(q, keys, values, allowed)) <= EXACT


def test_large_scores_do_not_overflow():
    """Scores of hundreds (exp overflows float32 at 89) and keys far below the maximum."""
    q, keys, values, allowed = attention_case(5, 64, 200, 0, 4, 2, scale=60.0)
    ours = kernel.tiled_attention(q, keys, values, allowed)
    assert np.all(np.isfinite(ours))
    assert relative_difference(ours, attention(q, keys, values, allowed)) <= EXACT


def test_exp_is_accurate_over_the_float32_range():
    x = -np.concatenate([np.linspace(0, 87.5, 100001), [0.0, 1e-30, 100.0, np.inf]])
    ours = np.array([kernel.exp_nonpositive(np.float32(v)) for v in x[::97]], dtype=np.float64)
    exact = np.exp(x[::97].astype(np.float32).astype(np.float64))
    assert np.all(np.abs(ours - exact) <= 3e-7 * exact + 1e-37)


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def long_model_directory(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("long"), seed=3, seq_length=8192)


def test_chunked_prefill_equals_one_pass(long_model_directory):
    chunked = ChatGLM2.from_pretrained(long_model_directory, prefill_chunk=64)
    one_pass = ChatGLM2.from_pretrained(long_model_directory, prefill_chunk=None)
    ids = np.random.default_rng(0).integers(0, 1024, 300)
    reference = one_pass.forward(ids)  # [T, V]
    assert relative_difference(chunked.forward(ids), reference) <= EXACT
    last = chunked.forward(ids, last_only=True)  # [1, V]
    assert last.shape == (1, reference.shape[1])
    assert relative_difference(last, reference[-1:]) <= EXACT
    # a trace runs in one pass: every intermediate has all 300 tokens
    _, trace = chunked.forward(ids, trace=True)
    assert trace["layers.0.mlp_act"].shape[0] == 300


def test_chunked_batch_with_left_padding_equals_one_pass(long_model_directory):
    """forward_batch's padding stays in the cache across chunks and is never attended to."""
    chunked = ChatGLM2.from_pretrained(long_model_directory, prefill_chunk=16)
    one_pass = ChatGLM2.from_pretrained(long_model_directory, prefill_chunk=None)
    prompts = [list(range(5, 60)), list(range(100, 130))]
    assert generate_batch(
        chunked, prompts, GenerationConfig(do_sample=False, max_new_tokens=4)
    ) == (generate_batch(one_pass, prompts, GenerationConfig(do_sample=False, max_new_tokens=4)))
    ids = np.zeros((2, 55), dtype=np.int64)
    mask = np.ones((2, 55), dtype=np.int64)
    ids[0], ids[1, 25:], mask[1, :25] = prompts[0], prompts[1], 0
    ours = chunked.forward_batch(ids, mask, [chunked.new_cache() for _ in range(2)])
    theirs = one_pass.forward_batch(ids, mask, [one_pass.new_cache() for _ in range(2)])
    assert relative_difference(ours[:, 25:], theirs[:, 25:]) <= EXACT


def test_4k_token_prompt_matches_the_oracle(long_model_directory):
    """4,200 tokens in chunks of 512 through the tiled kernel, against transformers' eager
    attention in float32, then a decode step over the 4K cache."""
    torch = pytest.importorskip("torch")
    from oracle import glm_oracle

    model = ChatGLM2.from_pretrained(long_model_directory)
    ids = np.random.default_rng(1).integers(0, model.config.padded_vocab_size, 4200)
    cache = model.new_cache()
    ours = model.forward(ids[:-1], cache)  # [T, V]
    ours_next = model.forward(ids[-1:], cache)  # [1, V]
    oracle = glm_oracle(model.config, model.weights)
    with torch.no_grad():
        theirs = oracle(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert relative_difference(ours, theirs[:-1]) <= EXACT
    assert relative_difference(ours_next, theirs[-1:]) <= EXACT


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_cache_stays_close_and_halves_memory(long_model_directory, dtype):
    model = ChatGLM2.from_pretrained(long_model_directory)
    ids = np.random.default_rng(2).integers(0, 1024, 700)
    full, half = model.new_cache(), model.new_cache(dtype=dtype)
    reference = model.forward(ids, full, last_only=True)
    ours = model.forward(ids, half, last_only=True)
    assert half.nbytes * 2 == full.nbytes
    # bfloat16 keeps 8 bits of mantissa, float16 11: the logits move by about that much
    assert relative_difference(ours, reference) <= (2e-2 if dtype == "bfloat16" else 3e-3)
    assert half.keys(0).dtype == np.float32  # the readable path sees widened values


def test_unknown_cache_dtype_is_a_clear_error(long_model_directory):
    model = ChatGLM2.from_pretrained(long_model_directory)
    with pytest.raises(ValueError, match="KV cache dtype='int8'"):
        model.new_cache(dtype="int8")


def test_prefill_memory_does_not_grow_with_the_prompt(tmp_path):
    """Peak traced memory of a 4,000-token prefill minus that of a 1,000-token one: with chunks,
    only the KV cache and the chunk's [chunk, S] attention masks (bool, a few temporaries) grow;
    in one pass the [T, 2F] activations and the [T, S] masks grow with the prompt."""
    directory = write_tiny_checkpoint(tmp_path, num_layers=1, seq_length=8192)

    def growth(model):
        peaks = []
        for T in (1000, 4000):
            ids = np.arange(T) % 1000
            model.forward(ids[:64], last_only=True)  # compile and warm everything first
            tracemalloc.start()
            cache = model.new_cache()
            model.forward(ids, cache, last_only=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        return peaks[1] - peaks[0], cache

    chunk = 256
    grown, cache = growth(ChatGLM2.from_pretrained(directory, prefill_chunk=chunk))
    masks = 8 * chunk * 3000  # bytes: [chunk, S] bool masks and their temporaries, S + 3000
    bound = 1.5 * cache.bytes_for(3000) + masks + 4_000_000  # + per-thread tiles, allocator
    print(f"chunked: +{grown / 1e6:.1f} MB for 3,000 more tokens (bound {bound / 1e6:.1f} MB)")
    assert grown <= bound
    one_pass, _ = growth(ChatGLM2.from_pretrained(directory, prefill_chunk=None))
    print(f"one pass: +{one_pass / 1e6:.1f} MB")
    assert one_pass > 3 * bound  # what chunking saves


# ---------------------------------------------------------------------------- limits
def test_forward_beyond_seq_length_is_a_clear_error(tmp_path):
    model = ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path))  # seq_length 512
    cache = model.new_cache()
    model.forward(np.arange(500), cache, last_only=True)
    with pytest.raises(ValueError, match="500 cached \\+ 20 new tokens = 520, beyond this model's"):
        model.forward(np.arange(20), cache)


def test_generation_beyond_seq_length_is_a_clear_error(tmp_path):
    model = ChatGLM2.from_pretrained(write_tiny_checkpoint(tmp_path))
    config = GenerationConfig(do_sample=False, max_new_tokens=100)
    with pytest.raises(ValueError, match="prompt \\(450 tokens.*is 550 tokens.*seq_length of 512"):
        generate(model, list(range(450)), config)
    # without max_new_tokens, generation stops at seq_length (max_length 8192 is the default)
    out = generate(model, list(range(500)), GenerationConfig(do_sample=False, vocab_limit=3))
    assert len(out) <= 12


def test_cli_prompt_plus_max_new_tokens_beyond_seq_length(tmp_path, capsys):
    tokenizer = pytest.importorskip("glm_numpy.assets").default_model_path() / "tokenizer.model"
    directory = write_tiny_checkpoint(tmp_path / "m", padded_vocab_size=8064)
    (directory / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    code = main(["generate", "word " * 300, "--model", str(directory), "--max-new-tokens", "400"])
    assert code == 2
    assert "plus --max-new-tokens 400 is" in capsys.readouterr().err


def test_a_cache_too_big_to_allocate_names_the_bytes():
    with pytest.raises(MemoryError, match="cannot allocate a KV cache of 63,050,394,738,688 bytes"):
        KVCache(28, 2, 128, capacity=2**40 // 1000, dtype="float32")


def test_attention_leaves_blas_threads_as_they_were():
    """The tiles run on single-threaded OpenBLAS, which is set back for the projections."""
    blas = kernel._openblas_threads()
    if blas is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS whose thread count can be read")
    before = blas[1]()
    q, keys, values, allowed = attention_case(0, 300, 300, 0, 8, 2)
    kernel.attention_context(q, keys, values, allowed)
    assert blas[1]() == before
