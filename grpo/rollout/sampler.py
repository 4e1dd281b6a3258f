"""Turns the last position's logits into the next token of each sequence: temperature, top-k, top-p and
min-p filtering, then a draw from each sequence's own generator (so a seeded completion samples the same
tokens whatever it is batched with). Pure tensor functions."""

from __future__ import annotations

import torch

from .sampling_params import SamplingParams


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """probs [B, V] (rows sum to 1); top_k [B] (0: off), top_p [B], min_p [B] -> renormalized [B, V]
    with the filtered-out tokens at zero."""
    V = probs.shape[-1]
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=probs.device).expand_as(probs)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    keep = rank < k[:, None]
    # Nucleus: keep the smallest prefix whose mass reaches top_p (a token is kept if the mass before it
    # is still short of top_p).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep &= mass_before < top_p[:, None]
    keep &= sorted_probs >= min_p[:, None] * sorted_probs[:, :1]
    keep[:, 0] = True  # the most likely token always survives
    filtered = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits [B, V] -> (token ids, their log-probabilities under log_softmax(logits / temperature);
    plain log_softmax for greedy rows)."""
    logits = logits.float()
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    logprobs = torch.log_softmax(logits / temperature[:, None], dim=-1)
    greedy = [p.greedy for p in params]
    tokens = logprobs.argmax(dim=-1)
    if not all(greedy):
        probs = logprobs.exp()
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):  # else nothing to filter
            probs = filter_probs(
                probs,
                torch.tensor([p.top_k for p in params], device=logits.device),
                torch.tensor([p.top_p for p in params], device=logits.device, dtype=torch.float32),
                torch.tensor([p.min_p for p in params], device=logits.device, dtype=torch.float32))
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i. Each row
        # draws its noise from its own generator, so a seeded sequence samples alike in any batch.
        noise = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=gen)
                             for gen in generators])
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(torch.tensor(greedy, device=tokens.device), tokens, sampled)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()
