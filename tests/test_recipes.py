"""Every shipped recipe loads and validates; the CI recipe runs SFT then GRPO from the SFT model."""

from pathlib import Path

import pytest

from grpo.cli import main
from grpo.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    load_recipe(path)


def test_ci_recipe_runs_sft_then_grpo(tmp_path):
    path = Path(__file__).resolve().parents[1] / "recipes" / "ci_tiny.yaml"
    out = tmp_path / "run"
    assert main(["sft", str(path), f"output_dir={out}", "logging.progress_bar=false"]) == 0
    assert main(["train", str(path), f"output_dir={out}", "model.preset=null", f"model.path={out / 'sft' / 'model'}",
                 "logging.progress_bar=false"]) == 0
    assert (out / "checkpoints" / "step-000004" / "model" / "config.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
