"""Recipes: YAML into typed sections, overrides, and errors that name the bad key."""

import pytest

from grpo.config import Recipe, RecipeError, load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_build_typed_sections(tmp_path):
    path = write(tmp_path, """
output_dir: out
max_steps: 5
model: {preset: micro}
algorithm: {loss_type: grpo, beta: 0.04}
rewards: [accuracy, {name: format, weight: 0.5}]
""")
    r = load_recipe(path, ["algorithm.epsilon_high=0.28", "sampling.num_generations=4", "optim.betas=[0.9, 0.95]"])
    assert isinstance(r, Recipe) and r.max_steps == 5 and r.model.preset == "micro"
    assert r.algorithm.loss_type == "grpo" and r.algorithm.beta == 0.04 and r.algorithm.epsilon_high == 0.28
    assert r.sampling.num_generations == 4 and r.optim.betas == [0.9, 0.95]
    assert [(x.name, x.weight) for x in r.rewards] == [("accuracy", 1.0), ("format", 0.5)]


@pytest.mark.parametrize("text, overrides, message", [
    ("model: {preset: micro}\nalgoritm: {beta: 0.1}", [], "unknown key 'algoritm'; allowed here: output_dir"),
    ("model: {preset: micro}", ["algorithm.loss_type=ppo"], "algorithm.loss_type: 'ppo' is not allowed; allowed: 'grpo'"),
    ("model: {preset: micro}", ["algorithm.beta=lots"], "algorithm.beta: expected float, got 'lots'"),
    ("model: {preset: micro}", ["sampling.num_generations=1"], "sampling.num_generations: GRPO compares"),
    ("model: {preset: micro, path: x}", [], "give exactly one of model.path"),
    ("model: {preset: micro}", ["optim.nope=1"], "unknown key 'optim.nope'"),
    ("model: {preset: micro}", ["max_steps"], "expected key.sub=value"),
    ("model: {preset: micro}", ["optim.compile=true", "parallel=fsdp"], "optim.compile: is not supported with parallel: fsdp"),
    ("model: {preset: micro}\ndevice: gpu", [], "device: 'gpu' is not allowed; allowed: 'auto'"),
    ("model: {preset: micro}", ["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization: must be in"),
    ("model: {preset: micro}", ["rollout.overlap=true", "rollout.backend=vllm"], "rollout.overlap: is our engine's"),
    ("model: {preset: micro}", ["tools.overlap=true"], "tools.overlap: overlaps tool calls with decoding, but"),
])
def test_bad_recipes_name_the_key_and_what_is_allowed(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(write(tmp_path, text), overrides)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
