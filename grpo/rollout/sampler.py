"""Turns the last position's logits into the next token of each sequence: temperature, top-k, top-p and
min-p filtering, then an exponential race whose noise belongs to each sequence alone (so a seeded completion
samples the same tokens whatever it is batched with). The noise comes from one of two samplers:

- "generator": each sequence's own `torch.Generator` (a CPU generator: the CPU default, and what every
  recorded CPU result used);
- "counter": a hash of (the sequence's seed, the position it draws for, the token), computed from tensors
  alone: no generator objects, no host sync, capturable in a CUDA graph (the CUDA default).
"""

from __future__ import annotations

import torch

from model import kernels
from model.kernels.reference import counter_exponential, counter_row_keys, counter_uniform

from .sampling_params import SamplingParams

__all__ = ["SAMPLERS", "counter_exponential", "counter_row_keys", "counter_uniform", "filter_probs", "sample"]


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


SAMPLERS = ("generator", "counter")

def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None] | None = None, *,
           seeds: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """logits [B, V] -> (token ids, their log-probabilities under log_softmax(logits / temperature);
    plain log_softmax for greedy rows).

    The noise: `generators` (one per row, None for greedy rows), or the counter sampler's `seeds` [B] and
    `positions` [B] (int64: each row's stream seed and the index of the token it draws)."""
    if (generators is None) == (seeds is None):
        raise ValueError("sample() needs exactly one source of noise: generators (the generator sampler) or "
                         "seeds and positions (the counter sampler)")
    if seeds is not None and positions is None:
        raise ValueError("the counter sampler needs positions [B] beside seeds [B]")
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    greedy = [p.greedy for p in params]
    if seeds is not None and not any(p.filters for p in params):
        # Nothing to filter: one pass over the logits (`model.kernels.counter_sample`), one copy to the host.
        tokens, chosen = kernels.counter_sample(logits, temperature, seeds, positions,  # type: ignore[arg-type]
                                                torch.tensor(greedy, device=logits.device))
        both = torch.cat([tokens.double(), chosen.double()]).tolist()
        return [int(t) for t in both[: len(params)]], both[len(params):]
    logits = logits.float()
    logprobs = torch.log_softmax(logits / temperature[:, None], dim=-1)
    tokens = logprobs.argmax(dim=-1)
    if not all(greedy):
        probs = logprobs.exp()
        if any(p.filters for p in params):  # else nothing to filter
            probs = filter_probs(
                probs,
                torch.tensor([p.top_k for p in params], device=logits.device),
                torch.tensor([p.top_p for p in params], device=logits.device, dtype=torch.float32),
                torch.tensor([p.min_p for p in params], device=logits.device, dtype=torch.float32))
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i. Each row
        # draws its noise from its own generator or counter, so a seeded sequence samples alike in any batch.
        if seeds is not None:
            noise = counter_exponential(seeds.to(probs.device), positions.to(probs.device), probs.shape[1])
        else:
            noise = torch.empty(probs.shape, device=probs.device)
            for row, gen in zip(noise.unbind(0), generators):  # type: ignore[arg-type]
                row.exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(torch.tensor(greedy, device=tokens.device), tokens, sampled)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()
