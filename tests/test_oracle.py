"""The whole model against transformers' GlmForCausalLM (spec §10) on tiny official-format
checkpoints: same logits (float32, relative 1e-5) and the same 32-token greedy continuation."""

import numpy as np
import pytest
import torch
from oracle import glm_oracle, rotary_inverse_frequencies

from glm_numpy import ChatGLM2
from glm_numpy.testing import write_tiny_checkpoint

CONFIGS = {
    "default": dict(),
    "deeper-odd-sizes": dict(
        num_layers=3,
        hidden_size=96,
        num_attention_heads=6,
        kv_channels=16,
        ffn_hidden_size=200,
        padded_vocab_size=1100,
    ),
    "wide-heads-bf16": dict(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=8,
        kv_channels=32,
        ffn_hidden_size=172,
        padded_vocab_size=2048,
        dtype="bfloat16",
    ),
    "bin-fp16": dict(fmt="bin", dtype="float16", padded_vocab_size=1024),
}
MAX_RELATIVE_ERROR = 1e-5


def greedy(next_logits, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(next_logits(ids))))
    return ids[len(prompt) :]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    options = dict(CONFIGS[request.param])
    directory = write_tiny_checkpoint(
        tmp_path_factory.mktemp(request.param),
        seed=len(request.param),
        fmt=options.pop("fmt", "safetensors"),
        dtype=options.pop("dtype", "float32"),
        multi_query_group_num=2,
        **options,
    )
    model = ChatGLM2.from_pretrained(directory)
    return model, glm_oracle(model.config, model.weights)


def test_the_oracle_rotates_half_of_each_head(pair):
    model, oracle = pair
    # R/2 frequencies: the oracle rotates R = Dh/2 dims, as ChatGLM2 does
    assert rotary_inverse_frequencies(oracle).numel() == model.config.rotary_dim // 2


def test_logits_match_the_oracle(pair):
    model, oracle = pair
    ids = np.random.default_rng(1).integers(0, model.config.padded_vocab_size, 48)
    ours = model.forward(ids)
    with torch.no_grad():
        theirs = oracle(torch.from_numpy(ids)[None]).logits[0].numpy()
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"max relative logit difference: {relative:.2e}")
    assert relative <= MAX_RELATIVE_ERROR


def test_greedy_continuation_matches_the_oracle(pair):
    model, oracle = pair
    prompt = [5, 17, 99, 3]
    cache = model.new_cache()
    fed = []

    def ours(ids):  # incremental: only the tokens the cache has not seen yet
        new = ids[len(fed) :]
        fed.extend(new)
        return model.forward(np.array(new), cache=cache, last_only=True)[-1]

    with torch.no_grad():
        generated = oracle.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False
        )
    assert greedy(ours, prompt, 32) == generated[0, len(prompt) :].tolist()
