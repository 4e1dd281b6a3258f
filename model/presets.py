"""Named model sizes to build from scratch: tiny ones for recipes, tests and benchmarks."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    # The peers' tiny DeepseekV3 (../shared/peers/tiny_setup.py): 256 wide, 4 layers, 8 routed experts, top-2.
    "tiny": dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                 n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96,
                 qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=512,
                 routed_scaling_factor=2.5),
    # Small enough for unit tests to run in milliseconds.
    "micro": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                  n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=256),
    # vLLM's MLA kernels need kv_lora_rank 512 and qk_rope_head_dim 64.
    "tiny-vllm": dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=96,
                      qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024),
    # DeepSeek-V2-Lite's shapes (2048 wide, 16 heads, no query LoRA, 64 routed experts top-6 + 2 shared) in 4
    # layers, for benchmarks on a GPU (bench/gpu.py): the real model's per-layer work, a few GB of weights.
    "v2-lite-shaped": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                           n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
                           qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096),
}


def preset_config(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """A ModelConfig of a named size; `overrides` replace any field."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}: allowed {sorted(PRESETS)}")
    kw = {**PRESETS[name], "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    kw.update(overrides)
    return ModelConfig(**kw)
