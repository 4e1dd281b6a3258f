"""Data-parallel GRPO on torch.distributed (gloo on CPU): two processes take the same step as one, for DDP and
FSDP; a run stopped on two ranks resumes on one and on two; the README's torchrun command runs as written.
The multi-process tests start real torchrun jobs and are marked slow; the single-process checks are not."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_micro_recipe

from grpo import distributed
from grpo.build import build_policy, build_tokenizer
from grpo.cli import main
from grpo.config import RecipeError, load_recipe
from grpo.trainer import GRPOTrainer
from model import load_pretrained

ROOT = Path(__file__).resolve().parents[1]

def recipe_file(tmp_path: Path) -> Path:
    """The micro recipe (tests/conftest.py) with the dense `distinct` reward, seed 3, DAPO with clip-higher."""
    return write_micro_recipe(tmp_path, reward="distinct", seed=3, algorithm={"loss_type": "dapo", "epsilon_high": 0.28},
                              optim={"lr": 3.0e-3, "micro_batch_size": 4})


def torchrun(nproc: int, args: list[str], cwd: Path | None = None) -> None:
    """`torchrun --standalone --nproc-per-node N -m grpo ARGS` in fresh processes that import this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "grpo",
           *args]
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_pretrained(run / "checkpoints" / f"step-{step:06d}" / "model").state_dict()


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]):
    """|a - b| / |a - start| over all weights: how far apart two runs ended, against how far training moved."""
    assert a.keys() == b.keys()
    apart = sum(float((a[k] - b[k]).double().square().sum()) for k in a) ** 0.5
    moved = sum(float((a[k] - start[k]).double().square().sum()) for k in a) ** 0.5
    assert moved > 0.5, moved  # training did move the weights
    return apart / moved


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    recipe = load_recipe(path)
    return build_policy(recipe, build_tokenizer(recipe)).state_dict()


def metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----- one process ----------------------------------------------------------------------------------------
def test_parallel_is_a_checked_recipe_key(tmp_path):
    path = recipe_file(tmp_path)
    assert load_recipe(path).parallel == "ddp"
    assert load_recipe(path, ["parallel=fsdp"]).parallel == "fsdp"
    with pytest.raises(RecipeError, match="parallel: 'zero3' is not allowed"):
        load_recipe(path, ["parallel=zero3"])


def test_without_a_process_group_the_helpers_change_nothing():
    module = torch.nn.Linear(3, 2)
    assert distributed.wrap(module, "fsdp", []) is module and distributed.loss_scale() == 1
    assert distributed.all_reduce_sums({"a": 2.0, "b": 3}) == {"a": 2.0, "b": 3}
    assert distributed.any_rank(False) is False and distributed.max_over_ranks(4) == 4
    assert distributed.all_gather_objects({"x": 1}) == [{"x": 1}]
    with distributed.gradient_sync(module, enabled=False):
        module(torch.ones(1, 3)).sum().backward()
    assert module.weight.grad is not None


def test_the_optimizer_state_is_keyed_by_name_and_loads_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # as in the trainer, which resumes before any backward
    state = distributed.optimizer_state(model, opt)
    assert set(state["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for saved in (state, opt.state_dict()):  # by name, and the positional form older checkpoints hold
        fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
        distributed.load_optimizer_state(model, fresh, saved)
        assert torch.equal(fresh.state_dict()["state"][2]["exp_avg"], opt.state_dict()["state"][2]["exp_avg"])


def test_a_group_samples_the_same_completions_whatever_else_is_generated_with_it(tmp_path):
    """What lets N ranks reproduce one: the sampling seed follows the prompt and the step, not the batch."""
    trainer = GRPOTrainer(load_recipe(recipe_file(tmp_path)))
    G = trainer.recipe.sampling.num_generations
    rows = [5, 9, 17, 30]
    together = trainer.rollout(rows)
    apart = trainer.rollout(rows[2:])  # what rank 1 of 2 generates
    assert apart.completion_ids == together.completion_ids[2 * G:]
    trainer.step += 1  # the next step samples other completions of the same prompts
    assert trainer.rollout(rows[2:]).completion_ids != apart.completion_ids


# ----- several processes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 2 GRPO steps in this process (no process group), prompts_per_step 4 over one rank."""
    tmp = tmp_path_factory.mktemp("one")
    path = recipe_file(tmp)
    GRPOTrainer(load_recipe(path)).train()
    return path, tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_take_the_same_steps_as_one(one_process, tmp_path, parallel):
    path, single = one_process
    run = tmp_path / "run2"
    torchrun(2, ["train", str(path), f"output_dir={run}", f"parallel={parallel}"])
    # The same global batch and seed: the same prompts and completions, the global normalizers, gradients
    # summed over ranks. Left to float rounding, the two runs end within 0.1% of how far they moved.
    assert relative_difference(weights(single, 2), weights(run, 2), initial_weights(path)) < 1e-3
    for a, b in zip(metrics(single), metrics(run), strict=True):
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)
        assert a["completions/mean_length"] == b["completions/mean_length"]
        # the gradient's size: Adam's step hides a scale error of the gradient; the logged norm does not
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-7)


@pytest.mark.slow
def test_a_run_stopped_on_two_ranks_resumes_on_one_and_on_two(tmp_path):
    path = recipe_file(tmp_path)
    # uninterrupted: 4 steps in one process
    straight = tmp_path / "straight"
    GRPOTrainer(load_recipe(path, ["max_steps=4", f"output_dir={straight}"])).train()
    # stopped: 2 steps on 2 FSDP ranks, checkpointed (sharded optimizer state, gathered into one file)
    stopped = tmp_path / "on_two"
    torchrun(2, ["train", str(path), f"output_dir={stopped}", "parallel=fsdp", "logging.save_every=2"])
    shutil.copytree(stopped, tmp_path / "on_one")
    # resumed on 1 rank (no process group) and on 2 ranks, to step 4
    assert main(["train", str(path), f"output_dir={tmp_path / 'on_one'}", "max_steps=4", "--resume"]) == 0
    torchrun(2, ["train", str(path), f"output_dir={stopped}", "parallel=fsdp", "max_steps=4", "--resume"])
    start = initial_weights(path)
    end = weights(straight, 4)
    for resumed in (tmp_path / "on_one", stopped):
        assert relative_difference(end, weights(resumed, 4), start) < 1e-3
        assert [m["step"] for m in metrics(resumed)] == [1, 2, 3, 4]
    assert relative_difference(end, weights(stopped, 2), start) > 0.1  # steps 3 and 4 did move the weights


@pytest.mark.slow
def test_the_readme_torchrun_command_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Several processes", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"^torchrun [^\n#]*", section, re.M).group(0).split()
    assert command[:6] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "grpo"], command
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")  # run where the README runs: beside recipes/
    torchrun(2, command[6:], cwd=tmp_path)
    out = tmp_path / re.search(r"output_dir=(\S+)", " ".join(command)).group(1)
    assert len(metrics(out)) == load_recipe(tmp_path / "recipes" / "ci_tiny.yaml").max_steps
