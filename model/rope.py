"""Rotary position embedding for MLA's decoupled key/query part, with YaRN context extension."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] (YaRN-blended when scaled) and the cos/sin amplitude factor."""
    dim, base, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not rs.enabled:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength fits `num_rotations` times into the original context.
        return dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1: high-frequency dims keep their frequency; 0: interpolated by `factor`
    inv_freq = inv_freq / rs.factor * (1 - keep_original) + inv_freq * keep_original
    if rs.mscale and rs.mscale_all_dim:
        amplitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        amplitude = yarn_mscale(rs.factor)
    return inv_freq, amplitude


class RotaryTable(torch.nn.Module):
    """Precomputed cos/sin for every position up to max_position_embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, amplitude = rope_frequencies(cfg)
        angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos() * amplitude, persistent=False)  # [P, dr/2]
        self.register_buffer("sin", angles.sin() * amplitude, persistent=False)
        self.interleaved = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, dr/2]."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond max_position_embeddings={self.cos.shape[0]}")
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates x [B, T, (H,) dr] by cos/sin [B, T, dr/2].

    Interleaved checkpoints (DeepSeek's own layout) rotate the pairs (x0, x1), (x2, x3), ...; the result is
    written de-interleaved (all first members, then all second members). Queries and keys get the same
    layout, so their dot products -- all attention ever uses -- are those of the interleaved rotation.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if x.dim() == 4:  # [B, T, H, dr]: broadcast over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The rotation of `apply_rope` as one matrix per token: cos/sin [N, dr/2] -> R [N, dr, dr] with
    apply_rope(x) == x @ R for x [N, ..., dr] (batched matmul). The decode step builds R once and rotates
    each layer's query and key with one matmul each, instead of a dozen small elementwise ops."""
    N, half = cos.shape
    out = torch.arange(half, device=cos.device)
    first = 2 * out if interleaved else out  # where x1 sits in x
    second = first + 1 if interleaved else out + half
    R = cos.new_zeros(N, 2 * half, 2 * half)
    R[:, first, out] = cos  # out1 = x1 cos - x2 sin
    R[:, second, out] = -sin
    R[:, second, out + half] = cos  # out2 = x2 cos + x1 sin
    R[:, first, out + half] = sin
    return R
