"""The layers of ChatGLM2, one readable NumPy function each (the definitions the kernels follow).

Shape legend used in every docstring and comment of the package:
T new tokens · S cached + new tokens · D hidden · H query heads · G kv groups · Dh head dim ·
R rotary dims (Dh/2) · F ffn · V vocab rows · O/I a linear layer's out/in features.
"""

from glm_numpy.layers.attention import (
    attend,
    attention,
    attention_probs,
    attention_scores,
    causal_mask,
    masked_softmax,
)
from glm_numpy.layers.embedding import embedding
from glm_numpy.layers.linear import linear
from glm_numpy.layers.lm_head import lm_head
from glm_numpy.layers.rms_norm import rms_norm
from glm_numpy.layers.rotary import apply_rotary, rotary_table
from glm_numpy.layers.swiglu import silu, swiglu

__all__ = [
    "apply_rotary",
    "attend",
    "attention",
    "attention_probs",
    "attention_scores",
    "causal_mask",
    "embedding",
    "linear",
    "lm_head",
    "masked_softmax",
    "rms_norm",
    "rotary_table",
    "silu",
    "swiglu",
]
