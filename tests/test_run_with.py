"""glm_numpy.exercises.run_with: a student's functions inside the whole default model."""

import numpy as np
import pytest

from glm_numpy import ChatGLM2, ChatGLM2Tokenizer
from glm_numpy.assets import default_model_path
from glm_numpy.exercises import EXERCISE_NAMES, references, run_with

PROMPT = "床前明月光"


@pytest.fixture(scope="module")
def default():
    path = default_model_path()
    return dict(
        model=ChatGLM2.from_pretrained(path), tokenizer=ChatGLM2Tokenizer.from_pretrained(path)
    )


def test_the_right_answers_change_nothing(default):
    correct = {name: getattr(references, name) for name in EXERCISE_NAMES}
    report = run_with(correct, PROMPT, max_new_tokens=12, **default)
    assert report.error is None and report.divergence is None
    assert report.same_text and report.reference
    assert "no divergence" in repr(report) and "the same text" in repr(report)


def test_a_rotary_bug_is_found_where_it_first_shows(default):
    def rotate_half(x, positions):  # the common mistake: pairs (i, i + R/2), not (2i, 2i+1)
        R = x.shape[-1] // 2
        swapped = x.copy()
        swapped[..., :R] = np.concatenate([x[..., R // 2 : R], x[..., : R // 2]], axis=-1)
        return references.rotary(swapped, positions)

    report = run_with({"rotary": rotate_half}, PROMPT, max_new_tokens=12, **default)
    assert report.divergence.name == "layers.0.attention.q_rotary"
    assert report.divergence_in == "the prompt's pass"
    text = repr(report)
    assert "first divergence: layers.0.attention.q_rotary[" in text and "│" in text


def test_a_cache_step_bug_shows_in_the_decode_step(default):
    def unrotated_keys(q, k, v, cache_k, cache_v):  # forgets to rotate the new key
        keys, values = np.concatenate([cache_k, k]), np.concatenate([cache_v, v])
        q = references.rotary(q, np.array([len(cache_k)]))
        return references.attention(q, keys, values), keys, values

    report = run_with({"kv_cache_step": unrotated_keys}, PROMPT, max_new_tokens=12, **default)
    assert report.divergence_in == "a decode step (with the KV cache)"
    assert report.divergence.name == "layers.0.attention.context"


def test_an_unfinished_or_misshapen_function_is_reported_not_raised(default):
    def unfinished(x, weight, eps):
        raise NotImplementedError

    report = run_with({"rms_norm": unfinished}, PROMPT, max_new_tokens=4, **default)
    assert report.error == "your rms_norm raised NotImplementedError" and report.yours == ""
    assert "stopped: your rms_norm raised NotImplementedError" in repr(report)
    report = run_with({"lm_head": lambda x, w: x}, PROMPT, max_new_tokens=4, **default)
    assert "'logits' returned shape" in report.error


def test_unknown_exercises_are_errors():
    with pytest.raises(ValueError, match="no exercise 'rotari'"):
        run_with({"rotari": print}, PROMPT)
