"""What a rollout returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Completion:
    """One sampled completion: its tokens, the log-probability of each under the policy that sampled it
    (after temperature, before top-k/top-p/min-p filtering: the distribution the trainer recomputes), and
    why it ended: "stop" (a stop token or string) or "length" (max_tokens).

    routed_experts: with routing recorded, the experts each fed token went to, [P + C - 1, M, K] int16
    (every prompt and completion token but the last, which was sampled and never fed; M MoE layers)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    routed_experts: torch.Tensor | None = None


@dataclass
class RequestOutput:
    """A prompt and its n completions, in the order of the request."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
