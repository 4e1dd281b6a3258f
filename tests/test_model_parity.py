"""Our model against transformers' DeepseekV3/V2ForCausalLM on the same checkpoint, both directions."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)

from model import build_model, load_pretrained
from model.presets import preset_config

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
            v_head_dim=12, max_position_embeddings=256, num_nextn_predict_layers=0)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)

CASES = {
    "v3_sigmoid_groups_bias": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(n_group=4, topk_group=2)),
    "v3_rope_not_interleaved": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(n_group=2, topk_group=1, rope_interleave=False)),
    "v2_softmax_greedy": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(topk_method="greedy", n_shared_experts=2)),
    "v2_group_limited": (DeepseekV2Config, DeepseekV2ForCausalLM,
                         dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    "v2_lite_q_lora_null": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(q_lora_rank=None, topk_method="greedy")),
    "v3_yarn": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(n_group=2, topk_group=2, rope_parameters=YARN)),
    "v2_yarn_q_lora_null": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(q_lora_rank=None, rope_parameters=YARN)),
    "v3_several_dense_first": (DeepseekV3Config, DeepseekV3ForCausalLM,
                               dict(num_hidden_layers=4, first_k_dense_replace=2, n_group=1, topk_group=1)),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every part of the network moves the logits; norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_their_checkpoint(case, tmp_path):
    config_cls, model_cls, overrides = CASES[case]
    theirs = model_cls(config_cls(**{**BASE, **overrides})).eval()
    randomize_(theirs, seed=1)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0))  # past YaRN's original 32
    expected = logits_of(theirs, ids)
    assert expected.std() > 0.3  # the comparison is not between near-zero tensors
    torch.testing.assert_close(logits_of(ours, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_our_checkpoint_with_the_same_logits(case, tmp_path):
    config_cls, _, overrides = CASES[case]
    cfg = config_cls(**{**BASE, **overrides})
    from model.config import ModelConfig

    ours = build_model(ModelConfig.from_hf_dict(cfg.to_dict())).eval()
    randomize_(ours, seed=2)
    ours.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == cfg.model_type
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))
    expected = logits_of(ours, ids)
    assert expected.std() > 0.3
    torch.testing.assert_close(logits_of(theirs, ids), expected, atol=1e-4, rtol=0)


def test_padded_batch_matches_transformers_with_attention_mask(tmp_path):
    theirs = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, "n_group": 4, "topk_group": 2})).eval()
    randomize_(theirs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_the_peer_tiny_config_round_trips(tmp_path):
    ours = build_model(preset_config("tiny", vocab_size=50))
    ours.save_pretrained(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_of(theirs, ids), logits_of(ours.eval(), ids), atol=1e-4, rtol=0)
