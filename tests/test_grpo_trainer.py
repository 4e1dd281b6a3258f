"""The GRPO loop end to end on a micro model: it learns, it resumes bit for bit, bad input stops early."""

import json

import torch

from grpo.cli import main
from grpo.config import load_recipe
from grpo.trainer import GRPOTrainer
from model import load_pretrained

REWARD = '''
def sevens(prompts, completions, completion_ids=None, **kw):
    """The share of the completion's characters that are '7': dense, so a random model gets signal."""
    return [c.count("7") / max(len(c), 1) for c in completions]
'''


def recipe_file(tmp_path, **extra):
    (tmp_path / "my_rewards.py").write_text(REWARD)
    text = f"""
output_dir: {tmp_path / "run"}
max_steps: 30
seed: 3
prompts_per_step: 4
model: {{preset: micro}}
data: {{source: addition, template: "{{prompt}}=", limit: 64}}
rewards: [{{name: "{tmp_path / 'my_rewards.py'}:sevens"}}]
sampling: {{num_generations: 8, max_completion_length: 6}}
algorithm: {{loss_type: dapo, epsilon_high: 0.28}}
optim: {{lr: 3.0e-3, micro_batch_size: 16}}
logging: {{save_every: 1000, tensorboard: false, progress_bar: false}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_grpo_raises_the_reward_of_a_toy_task(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path))
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


def test_periodic_evaluation_is_logged(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path), ["max_steps=2", "logging.eval_steps=1", "data.eval_limit=4"])
    history = GRPOTrainer(recipe).train()
    assert all("eval/pass@1" in h and "eval/format" in h for h in history)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= logged[-1]["eval/pass@1"] <= 1.0


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    path = recipe_file(tmp_path)
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


def test_bad_input_stops_with_one_error_and_leaves_checkpoints_alone(tmp_path, capsys):
    path = recipe_file(tmp_path)
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
