"""Sliding-window perplexity: how surprised the model is by a text, exp(mean negative log-lik.).

A text longer than the model's context (or than we want to pay for) is scored in windows of
``window`` tokens that start every ``stride`` tokens. Each window is a fresh forward pass, and
only the tokens no earlier window has scored are counted, so every token after the first is
scored exactly once, with up to ``window - stride`` tokens of context it inherits from the overlap:

    ids      t0 t1 t2 t3 t4 t5 t6 t7 t8      (window 6, stride 3)
    pass 1   [t0 ............. t5]           scores t1..t5 (predicted from what precedes them)
    pass 2            [t3 ............. t8]  scores t6..t8

stride == window is fastest (no overlap, short contexts); smaller strides give each scored token
more context and a lower, fairer perplexity, at window/stride times the cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from glm_numpy.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    scored_tokens: int
    window: int
    stride: int


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits [T, V], targets [T] -> -log softmax(logits)[t, targets[t]], [T] float64."""
    z = logits.astype(np.float64)  # [T, V]
    top = z.max(axis=-1, keepdims=True)  # [T, 1]
    log_normaliser = top[:, 0] + np.log(np.exp(z - top).sum(axis=-1))  # [T]
    return log_normaliser - z[np.arange(len(targets)), targets]


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """The first token of each window over ``length`` tokens: every ``stride``, until a window
    reaches the end."""
    starts = [0]
    while starts[-1] + window < length:
        starts.append(starts[-1] + stride)
    return starts


def perplexity(
    model, ids: Sequence[int], window: int, stride: int, progress: bool = False
) -> Perplexity:
    """model (with ``forward(ids [T]) -> logits [T, V]``), ids [N] -> Perplexity of ids[1:].
    progress=True: a bar over the windows on stderr once they take over a second."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 token ids, got {len(ids)}")
    if not 1 <= stride <= window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    total, count, scored_until = 0.0, 0, 1  # token 0 has no context: never scored
    starts = window_starts(len(ids), window, stride)
    with progress_bar(len(starts), "perplexity", "window", enabled=progress) as bar:
        for start in starts:
            end = min(start + window, len(ids))
            logits = model.forward(
                ids[start:end]
            )  # [end - start, V]: row p predicts ids[start+p+1]
            first = max(scored_until, start + 1)  # the first token this window scores
            nll = token_nll(logits[first - start - 1 : end - start - 1], ids[first:end])
            total, count, scored_until = total + float(nll.sum()), count + len(nll), end
            bar.update(1)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, window, stride)
