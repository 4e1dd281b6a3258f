"""MoE routing replay: the engine records the experts each token went to, and the training forward can send
each token to those experts again, even after the router's weights or bias moved."""

import pytest
import torch

from grpo.config import RecipeError, load_recipe
from grpo.rollout import SamplingParams
from grpo.rollout.engine import Engine
from grpo.trainer import GRPOTrainer
from model import build_model, load_pretrained
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


def micro(seed=0):
    return build_model(preset_config("micro", vocab_size=len(TOK)), seed=seed).eval()


def perturb_router(model, scale=0.5, seed=7):
    """Moves every gate's weights, as an optimizer step or a bias update would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.weight.add_(torch.randn(m.gate.weight.shape, generator=g) * scale)


def test_replaying_the_recorded_routing_reproduces_the_forward():
    model = micro()
    ids = torch.randint(3, len(TOK), (3, 11))
    model.record_routing(True)
    logits = model(ids)
    routing = model.recorded_routing()
    assert routing.shape == (3, 11, 2, 2)  # [B, T, M MoE layers, K]
    torch.testing.assert_close(model(ids, routing=routing.to(torch.int16)), logits, rtol=0, atol=0)
    torch.testing.assert_close(model(ids, routing=torch.full_like(routing, -1)), logits, rtol=0, atol=0)


def test_forced_experts_are_used_and_the_gate_still_learns():
    model = micro()
    ids = torch.randint(3, len(TOK), (2, 9))
    model.record_routing(True)
    free = model(ids)
    own = model.recorded_routing()
    forced = (own + 1) % model.config.n_routed_experts  # a shift keeps each token's K experts distinct
    forced[1] = -1  # the second sequence routes itself
    out = model(ids, routing=forced)
    used = model.recorded_routing()
    assert torch.equal(used[0], forced[0]) and torch.equal(used[1], own[1])
    assert not torch.allclose(out[0], free[0]) and torch.allclose(out[1], free[1], atol=1e-6)
    out.square().mean().backward()
    for m in model.moe_layers():
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_replays_the_same_experts():
    model = micro()
    ids = torch.randint(3, len(TOK), (2, 9))
    model.record_routing(True)
    model(ids)
    forced = (model.recorded_routing() + 3) % model.config.n_routed_experts
    model.train()
    plain = model(ids, routing=forced)
    model.model.gradient_checkpointing = True
    torch.testing.assert_close(model(ids, routing=forced), plain)


@pytest.mark.parametrize("num_blocks", [256, 12])  # 12: preemption recomputes sequences
def test_engine_records_the_experts_of_every_fed_token(num_blocks):
    model = micro(seed=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    engine = Engine(model, block_size=4, num_blocks=num_blocks, record_routing=True)
    outputs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=2, ignore_eos=True))
    if num_blocks == 12:
        assert engine.last_stats["preemptions"] > 0
    model.record_routing(True)
    for prompt, out in zip(prompts, outputs):
        for c in out.completions:
            fed = prompt + c.token_ids[:-1]
            assert c.routed_experts.shape == (len(fed), 2, 2) and c.routed_experts.dtype == torch.int16
            with torch.no_grad():
                model(torch.tensor([fed]))  # the same tokens in one expanded forward
            assert torch.equal(c.routed_experts.long(), model.recorded_routing()[0])
    model.record_routing(False)
    plain = Engine(model, block_size=4, num_blocks=256).generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert plain[0].completions[0].routed_experts is None


def tiny_recipe(micro_recipe, replay: bool, backend: str = "ours"):
    return micro_recipe(prompts_per_step=2, data={"limit": 16}, sampling={"max_completion_length": 8},
                        rollout={"backend": backend}, algorithm={"routing_replay": replay},
                        optim={"lr": 1.0e-3, "micro_batch_size": 8})


def test_trainer_replays_the_rollout_routing_after_the_router_moved(micro_recipe):
    trainer = GRPOTrainer(load_recipe(tiny_recipe(micro_recipe, replay=True)))
    ro, _ = trainer.collect()
    batch = ro.micro_batch(list(range(len(ro.completion_ids))), routing_replay=True)
    rollout_lp = batch["rollout_logprobs"]
    perturb_router(trainer.policy)  # the router moved between sampling and training
    policy = trainer.policy
    policy.record_routing(True)
    with torch.no_grad():
        replayed_lp, _ = trainer.completion_logprobs(policy, batch)
        used = policy.recorded_routing()
        own_lp, _ = trainer.completion_logprobs(policy, batch, replay=False)
        own = policy.recorded_routing()
    policy.record_routing(False)
    recorded = batch["routing"].long()
    fed = recorded[..., 0, 0] >= 0
    assert torch.equal(used[fed], recorded[fed])
    assert not torch.equal(own[fed], recorded[fed])  # left alone, the moved router picks other experts
    mask = batch["mask"]
    assert not torch.allclose(replayed_lp[mask], own_lp[mask])
    assert rollout_lp[mask].abs().sum() > 0
    metrics = trainer.train_step()  # and a whole step runs with replay on
    assert metrics["rollout/logprob_abs_diff"] >= 0


def test_routing_replay_needs_our_engine(micro_recipe):
    with pytest.raises(RecipeError, match="algorithm.routing_replay"):
        load_recipe(tiny_recipe(micro_recipe, replay=True, backend="vllm"))


def test_bfloat16_computes_in_bf16_and_updates_float32_master_weights(micro_recipe):
    recipe = load_recipe(tiny_recipe(micro_recipe, replay=False), ["model.dtype=bfloat16", "max_steps=1", "optim.lr=1e-6"])
    trainer = GRPOTrainer(recipe)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    ro, _ = trainer.collect()
    batch = ro.micro_batch(list(range(len(ro.completion_ids))), routing_replay=True)
    with torch.no_grad():
        bf16_lp, _ = trainer.completion_logprobs(trainer.policy, batch)
    fp32_lp = batch["rollout_logprobs"]  # the engine ran the same float32 weights without autocast
    gap = (bf16_lp - fp32_lp)[batch["mask"]].abs().max()
    assert 1e-4 < gap < 0.5, gap  # bf16 rounding, not a different model
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["grad_norm"] > 0
    deltas = {k: (v - before[k]).abs() for k, v in trainer.policy.state_dict().items() if v.is_floating_point()}
    assert max(float(d.max()) for d in deltas.values()) < 3e-6  # Adam moves each weight by about lr
    # weights above 0.01 moved by ~1e-6: below bf16's resolution there (2^-8 relative), kept by the fp32 masters
    assert sum(int(((d > 0) & (before[k].abs() > 0.01)).sum()) for k, d in deltas.items()) > 1000
    saved = trainer.save()
    reloaded = load_pretrained(saved / "model").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in trainer.policy.state_dict().items() if k in reloaded)
