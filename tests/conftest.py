"""Shared test helpers: `micro_recipe` writes a micro-model GRPO recipe with a dense reward (a random model
gets signal), the recipe several test files used to write out by hand."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

DENSE_REWARDS = '''
def sevens(prompts, completions, completion_ids=None, **kw):
    """The share of the completion's characters that are '7': dense, so a random model gets signal."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def distinct(prompts, completions, completion_ids=None, **kw):
    """The share of distinct characters: dense, so every group of a random model has signal."""
    return [len(set(c)) / max(len(c), 1) for c in completions]
'''


def write_micro_recipe(tmp_path: Path, reward: str = "sevens", **sections: Any) -> Path:
    """tmp_path/recipe.yaml: a micro model on the addition task, the dense reward `reward` (sevens or distinct)
    from tmp_path/dense_rewards.py, output in tmp_path/run, on the CPU. `sections` replace top-level keys; a dict
    updates a section's defaults (e.g. optim={"lr": 1e-3})."""
    (tmp_path / "dense_rewards.py").write_text(DENSE_REWARDS)
    recipe: dict[str, Any] = {
        "output_dir": str(tmp_path / "run"),
        # The CPU whatever the machine has: the tests tuned on it (sampling, learning, torchrun's 2 ranks on one
        # host) mean the same on a GPU machine; a test of the GPU path passes device=... (tests/devices.py).
        "device": "cpu",
        "max_steps": 2,
        "seed": 0,
        "prompts_per_step": 4,
        "model": {"preset": "micro"},
        "data": {"source": "addition", "template": "{prompt}=", "limit": 64},
        "rewards": [{"name": f"{tmp_path / 'dense_rewards.py'}:{reward}"}],
        "sampling": {"num_generations": 4, "max_completion_length": 6},
        "optim": {"lr": 3.0e-3, "micro_batch_size": 16},
        "logging": {"save_every": 1000, "tensorboard": False, "progress_bar": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def micro_recipe(tmp_path: Path) -> Callable[..., Path]:
    """`micro_recipe(**sections)`: `write_micro_recipe` in this test's tmp_path."""

    def write(**sections: Any) -> Path:
        return write_micro_recipe(tmp_path, **sections)

    return write
