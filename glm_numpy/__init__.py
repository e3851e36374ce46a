"""glm_numpy: a readable NumPy + numba interpreter for ChatGLM2-6B."""

import os

# Before numpy loads OpenBLAS, which reads it once: its threads sleep right after each sgemm
# instead of spinning for about 0.1 s over the numba kernels that run between two sgemms
# (glm_numpy/kernels/__init__.py, "Threads"). A value the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from glm_numpy.assets import default_model_path
from glm_numpy.cache import KVCache
from glm_numpy.chatglm3 import ChatGLM3Tokenizer
from glm_numpy.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint
from glm_numpy.config import ChatGLM2Config, ConfigError
from glm_numpy.family import load_tokenizer
from glm_numpy.generation import ChatSession, GenerationConfig, chat, generate, stream_chat
from glm_numpy.model import ChatGLM2
from glm_numpy.tokenizer import ChatGLM2Tokenizer, TokenizerError, build_prompt

__all__ = [
    "ChatGLM2",
    "ChatGLM2Config",
    "ChatGLM2Tokenizer",
    "ChatGLM3Tokenizer",
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "KVCache",
    "TokenizerError",
    "UnsafeCheckpointError",
    "build_prompt",
    "chat",
    "default_model_path",
    "generate",
    "load_checkpoint",
    "load_tokenizer",
    "stream_chat",
]
