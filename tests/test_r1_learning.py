"""The README's recipe, CI-sized: the same SFT and 40 GRPO steps; the reward must rise and held-out pass@1 with it."""

import json
from pathlib import Path

import pytest

from grpo.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "r1_tiny.yaml"


@pytest.mark.slow
def test_ci_sized_r1_recipe_raises_the_reward_and_held_out_pass_at_1(tmp_path):
    out = tmp_path / "run"
    assert main(["r1", str(RECIPE), f"output_dir={out}", "max_steps=40", "evaluation.limit=64",
                 "logging.progress_bar=false", "logging.save_every=1000"]) == 0
    report = json.loads((out / "report.json").read_text())
    rewards = [json.loads(line)["reward"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last, rewards)
    assert report["grpo_eval"]["pass@1"] > report["sft_eval"]["pass@1"] + 0.05, report
    assert report["grpo_eval"]["format"] >= 0.95
