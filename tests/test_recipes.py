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


def test_r1_command_runs_every_stage_and_writes_the_report(tmp_path):
    import json

    path = Path(__file__).resolve().parents[1] / "recipes" / "ci_tiny.yaml"
    out = tmp_path / "run"
    assert main(["r1", str(path), f"output_dir={out}", "logging.progress_bar=false", "evaluation.limit=8",
                 "evaluation.n=2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"sft", "eval_sft", "grpo", "eval_grpo"}
    assert report["held_out_problems"] == 8
    for stage in ("sft_eval", "grpo_eval"):
        assert 0 <= report[stage]["pass@1"] <= 1 and 0 <= report[stage]["format"] <= 1
    assert report["pass@1_gain"] == report["grpo_eval"]["pass@1"] - report["sft_eval"]["pass@1"]
    assert (out / "sft" / "model" / "config.json").exists() and (out / "checkpoints" / "step-000004").exists()
    assert all(Path(p).exists() for p in report["plots"]) and "reward.png" in " ".join(report["plots"])
    assert "| after GRPO |" in (out / "report.md").read_text()
    assert main(["r1", str(path), f"output_dir={out}"]) == 2  # never over an existing run


def test_the_tool_recipe_dry_runs_its_rewards_and_a_trial_call(capsys):
    assert main(["train", str(RECIPES[0].parent / "tool_tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "malformed_tool_calls" in out and "no problems found" in out
    assert "python: trial call print(6 * 7) -> '42'" in out
    assert "dry run: OK" in out
