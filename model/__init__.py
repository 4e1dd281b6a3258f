"""DeepSeek-V3 (and V2) in PyTorch: Multi-head Latent Attention, DeepSeekMoE and Multi-Token Prediction,
reading and writing Hugging Face checkpoints."""

from .cache import CacheView, LatentCache, contiguous_view
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import ConfigError, ModelConfig, RopeScaling
from .transformer import CausalLM


def build_model(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    """A fresh, randomly initialized model of any size (tiny recipes and tests)."""
    import torch

    return CausalLM(cfg).init_weights(torch.Generator().manual_seed(seed))


__all__ = ["CacheView", "CausalLM", "CheckpointError", "ConfigError", "LatentCache", "ModelConfig",
           "RopeScaling", "build_model", "contiguous_view", "load_pretrained", "save_pretrained"]
