"""Runs the model for a batch of sequences over the paged latent cache: the expanded MLA path for
prefill, the weight-absorbed path for decode. Tensors in, last-position logits out; it makes no
scheduling decisions."""

from __future__ import annotations

import torch

from model import CacheView, CausalLM, LatentCache

from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        self.model = model
        self.block_size = block_size
        device = model.lm_head.weight.device
        self.cache = LatentCache(model.config, num_blocks * block_size, dtype or model.lm_head.weight.dtype, device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's latents (all layers) into block dst."""
        bs = self.block_size
        for src, dst in copies:
            self.cache.data[:, dst * bs:(dst + 1) * bs] = self.cache.data[:, src * bs:(src + 1) * bs]

    def _slots(self, seqs: list[Sequence], positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] (-1: none) -> cache slots [B, T] (-1 where position is -1)."""
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        p = positions.clamp(min=0)
        slots = tables.gather(1, p // self.block_size) * self.block_size + p % self.block_size
        return torch.where(positions >= 0, slots, torch.full_like(slots, -1))

    @torch.no_grad()
    def forward(self, seqs: list[Sequence], prefill: bool) -> torch.Tensor:
        """Feeds each sequence's uncached tokens; returns the logits of its last token [B, V] (float32)."""
        starts = [s.num_cached for s in seqs]
        lens = [s.num_tokens for s in seqs]
        T = max(n - c for n, c in zip(lens, starts))
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        positions = torch.full((len(seqs), T), -1, dtype=torch.long)
        for b, (s, c, n) in enumerate(zip(seqs, starts, lens)):
            ids[b, : n - c] = torch.tensor(s.token_ids[c:n])
            positions[b, : n - c] = torch.arange(c, n)
        S = max(lens)
        context = torch.arange(S).expand(len(seqs), S)
        context = torch.where(context < torch.tensor(lens)[:, None], context, torch.full_like(context, -1))
        view = CacheView(self.cache, self._slots(seqs, positions), self._slots(seqs, context).clamp(min=0))
        device = self.model.lm_head.weight.device
        hidden = self.model.hidden_states(ids.to(device), positions.clamp(min=0).to(device), cache=view,
                                          absorb=not prefill)
        last = hidden[torch.arange(len(seqs)), torch.tensor(lens) - torch.tensor(starts) - 1]  # [B, D]
        for s in seqs:
            s.num_cached = s.num_tokens
        return self.model.lm_head(self.model.model.norm(last)).float()
