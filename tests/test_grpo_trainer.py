"""The GRPO loop end to end on a micro model: it learns, it resumes bit for bit, bad input stops early."""

import json

import torch

from grpo.cli import main
from grpo.config import load_recipe
from grpo.trainer import GRPOTrainer
from model import load_pretrained

# A dense reward (`sevens`, tests/conftest.py) on the micro model, 30 steps: enough for it to learn.
RECIPE = {"max_steps": 30, "seed": 3, "sampling": {"num_generations": 8},
          "algorithm": {"loss_type": "dapo", "epsilon_high": 0.28}}


def test_grpo_raises_the_reward_of_a_toy_task(tmp_path, micro_recipe):
    recipe = load_recipe(micro_recipe(**RECIPE))
    history = GRPOTrainer(recipe).train()
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert last > 0.3 and last > 3 * first, (first, last)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    logged = json.loads(lines[-1])
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "time/rollout_s", "time/update_s", "tokens_per_s"):
        assert key in logged
    assert (tmp_path / "run" / "completions.jsonl").exists()


def test_periodic_evaluation_is_logged(tmp_path, micro_recipe):
    recipe = load_recipe(micro_recipe(**RECIPE), ["max_steps=2", "logging.eval_steps=1", "data.eval_limit=4"])
    history = GRPOTrainer(recipe).train()
    assert all("eval/pass@1" in h and "eval/format" in h for h in history)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= logged[-1]["eval/pass@1"] <= 1.0


def test_rollouts_from_a_bfloat16_copy_of_the_float32_policy(tmp_path, micro_recipe):
    """rollout.dtype: bfloat16 over a float32 policy: the engine decodes its own bf16 copy, refreshed after every
    optimizer step (the copy equals the policy, cast, when each step's rollouts start)."""
    recipe = load_recipe(micro_recipe(**RECIPE), ["max_steps=3", "rollout.dtype=bfloat16"])
    trainer = GRPOTrainer(recipe)
    engine = trainer.engine
    assert engine.decodes_a_copy and engine.model.lm_head.weight.dtype == torch.bfloat16
    history = trainer.train()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    engine.generate([[5, 6]], engine_params())  # the refresh happens at the start of a generate
    policy = trainer.policy if hasattr(trainer, "policy") else trainer.model
    assert torch.equal(engine.model.lm_head.weight, policy.lm_head.weight.detach().to(torch.bfloat16))


def engine_params():
    from grpo.rollout import SamplingParams

    return SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, micro_recipe):
    path = micro_recipe(**RECIPE)
    straight = load_recipe(path, ["max_steps=4", f"output_dir={tmp_path / 'a'}", "logging.save_every=2"])
    GRPOTrainer(straight).train()
    first = load_recipe(path, ["max_steps=2", f"output_dir={tmp_path / 'b'}", "logging.save_every=2"])
    GRPOTrainer(first).train()
    resumed = load_recipe(path, ["max_steps=4", f"output_dir={tmp_path / 'b'}", "logging.save_every=2"])
    GRPOTrainer(resumed, resume=True).train()
    a = load_pretrained(tmp_path / "a" / "checkpoints" / "step-000004" / "model").state_dict()
    b = load_pretrained(tmp_path / "b" / "checkpoints" / "step-000004" / "model").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_pretrained(tmp_path / "b" / "checkpoints" / "step-000002" / "model").state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)  # training did move the weights


def test_bad_input_stops_with_one_error_and_leaves_checkpoints_alone(tmp_path, micro_recipe, capsys):
    path = micro_recipe(**RECIPE)
    assert main(["train", str(path), "max_steps=1", "logging.save_every=1"]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in ckpts.iterdir())
    capsys.readouterr()
    assert main(["train", str(path), "algorithm.loss_type=ppo", "--resume"]) == 2
    assert "algorithm.loss_type: 'ppo' is not allowed" in capsys.readouterr().err
    assert main(["train", str(path)]) == 2  # would overwrite: needs --resume or a new output_dir
    assert "already holds checkpoints" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    assert main(["train", str(path), f"data.source={tmp_path / 'q.jsonl'}", f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "prompt" in err and "question" in err
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "1" * 300, "answer": "1"}) + "\n")
    assert main(["train", str(path), f"data.source={tmp_path / 'long.jsonl'}", f"output_dir={tmp_path / 'y'}"]) == 2
    assert "exceeds the model's context of 256" in capsys.readouterr().err
    assert sorted(p.name for p in ckpts.iterdir()) == before
