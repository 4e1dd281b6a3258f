"""grpo/build.py: a recipe becomes its pieces one way; the engine applies recipe.rollout wherever it is built,
and both engines answer the RolloutEngine protocol's questions."""

import pytest

from grpo.build import build_engine, build_optimizer, build_policy, build_rewards, build_rows, build_tokenizer
from grpo.config import RecipeError, load_recipe
from grpo.rollout.engine import Engine
from grpo.rollout.protocol import RolloutEngine
from grpo.rollout.vllm_backend import VLLMEngine


def test_the_engine_applies_the_recipes_rollout_section():
    recipe = load_recipe(overrides=["model.preset=micro", "rollout.block_size=8", "rollout.max_num_seqs=5",
                                    "algorithm.routing_replay=true"])
    tokenizer = build_tokenizer(recipe)
    policy = build_policy(recipe, tokenizer)
    engine = build_engine(policy, tokenizer, recipe.rollout, seed=recipe.seed,
                          record_routing=recipe.algorithm.routing_replay)
    assert (engine.block_size, engine.max_num_seqs) == (8, 5)
    assert engine.records_routing and engine.runs_model_in_place
    engine.close()


def test_rollout_overlap_is_refused_by_name_where_the_policy_is_not_on_cuda():
    recipe = load_recipe(overrides=["model.preset=micro", "device=cpu", "rollout.overlap=true"])
    tokenizer = build_tokenizer(recipe)
    with pytest.raises(RecipeError, match="rollout.overlap: runs decode steps ahead on a CUDA device.*on cpu"):
        build_engine(build_policy(recipe, tokenizer), tokenizer, recipe.rollout, seed=recipe.seed)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_a_bfloat16_rollout_warns_only_on_a_cpu_that_does_not_multiply_bfloat16(monkeypatch, native_bf16):
    import warnings

    import grpo.build

    monkeypatch.setattr(grpo.build, "cpu_has_bf16_dot", lambda: native_bf16)
    recipe = load_recipe(overrides=["model.preset=micro", "device=cpu", "rollout.dtype=bfloat16"])
    tokenizer = build_tokenizer(recipe)
    policy = build_policy(recipe, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = build_engine(policy, tokenizer, recipe.rollout, seed=recipe.seed)
        float32_engine = build_engine(policy, tokenizer, load_recipe(overrides=["model.preset=micro"]).rollout)
    said = [str(w.message) for w in caught if "rollout.dtype" in str(w.message)]
    assert len(said) == (0 if native_bf16 else 1)  # the float32 engine never warns
    assert engine.decodes_a_copy and not float32_engine.decodes_a_copy
    if not native_bf16:
        assert "without AVX-512 BF16 or AMX" in said[0] and "rollout.dtype: auto keeps float32" in said[0]
    engine.close()
    float32_engine.close()


def test_both_engines_declare_what_the_protocol_asks():
    for cls in (Engine, VLLMEngine):
        for name in ("generate", "update_weights", "close", "records_routing", "runs_model_in_place"):
            assert hasattr(cls, name), (cls.__name__, name)
    assert VLLMEngine.records_routing is False and VLLMEngine.runs_model_in_place is False
    assert RolloutEngine.__doc__


def test_rows_rewards_and_optimizer_follow_the_recipe():
    recipe = load_recipe(overrides=["model.preset=micro", "data.limit=5", "optim.warmup_steps=2", "optim.lr=0.5"])
    assert len(build_rows(recipe)) == 5 and len(build_rows(recipe, limit=3)) == 3
    assert list(build_rewards(recipe).names) == [r.name for r in recipe.rewards]
    _, lr_schedule = build_optimizer(recipe, build_policy(recipe, build_tokenizer(recipe)))
    assert lr_schedule.get_last_lr() == [0.25]  # warmup: step 0 of 2
