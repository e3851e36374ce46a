"""Shared test set-up: reproducible hypothesis profiles and paths to shared test data."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI: derandomised (the same examples every run) and bounded, so a red run can be reproduced.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REAL_TOKENIZER = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chatglm2-tokenizer"
) / "tokenizer.model"


@pytest.fixture(scope="session")
def real_tokenizer_path() -> Path:
    """The real ChatGLM2 tokenizer.model from ../shared (never committed to this repository)."""
    path = Path(os.environ.get("CHATGLM2_TOKENIZER", REAL_TOKENIZER))
    if not path.is_file():
        pytest.skip(f"the real ChatGLM2 tokenizer is not at {path} (set CHATGLM2_TOKENIZER)")
    return path
