"""docs/architecture.md's shape tables are generated from the code: regenerate and compare.
And the step-through notebooks are committed without outputs (CI executes them instead)."""

import json
from pathlib import Path

import numpy as np
import pytest

from glm_numpy.shapes import (
    activation_shapes,
    generated_block,
    official_config,
    symbol_of_size,
    weight_rows,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_architecture_doc_holds_the_tables_the_code_generates():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    assert generated_block() in text, (
        "docs/architecture.md is stale: run python -m glm_numpy.shapes --write docs/architecture.md"
    )


def test_weights_add_up_to_the_official_checkpoint_size():
    # spec §2.1: the index's total_size, every tensor stored in 2 bytes
    total = sum(int(np.prod(row.shape)) * row.count for row in weight_rows(official_config()))
    assert 2 * total == 12_487_168_064


def test_traced_activation_shapes_follow_the_legend():
    shapes = activation_shapes()
    assert shapes["layers.{i}.attention.q_rotary"] == ("T", "H", "Dh")
    assert shapes["layers.{i}.attention.k_rotary"] == ("T", "G", "Dh")
    assert shapes["layers.{i}.attention.probs"] == ("H", "T", "S")
    assert shapes["layers.{i}.mlp_act"] == ("T", "F")
    assert shapes["logits"] == ("T", "V")
    assert shapes["cache keys / values (per layer)"] == ("S", "G", "Dh")


def test_a_probe_whose_sizes_collide_is_refused():
    with pytest.raises(ValueError, match="ambiguous"):
        symbol_of_size(official_config(), T=4096, S=5)  # T would look like D


def test_step_through_notebooks_are_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    assert len(notebooks) == 16  # 00-tour ... 14-debugging-a-port, 15-long-context
    for path in notebooks:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (
                    f"{path.name}: strip its outputs before committing "
                    "(jupyter nbconvert --clear-output --inplace)"
                )
