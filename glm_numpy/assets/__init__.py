"""Package data: the embedded default model (a tiny ChatGLM2 trained on public-domain text)."""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    """The directory of the embedded default model: config.json, model.safetensors,
    tokenizer.model and MODEL_CARD.md, loadable with ``ChatGLM2.from_pretrained``."""
    return Path(__file__).parent / "default_model"
