"""What the trainer and evaluation need of a rollout engine: `RolloutEngine`. Our `Engine` and vLLM's
`VLLMEngine` both satisfy it, so callers ask an engine what it can do instead of which class it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .outputs import RequestOutput
from .sampling_params import SamplingParams


class RolloutEngine(Protocol):
    """Generates n completions per prompt (token ids, one log-probability per token) from a policy.

    records_routing: each completion carries the experts that sampled it (`Completion.routed_experts`),
        which routing replay needs.
    runs_model_in_place: the engine generates with the trainer's model object itself (an optimizer step is
        seen at the next `generate`); False for an engine holding its own copy of the weights, which only
        `update_weights` refreshes.
    """

    records_routing: bool
    runs_model_in_place: bool

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 *, use_tqdm: bool = False) -> list[RequestOutput]:
        """prompts: token ids per request; params: one for all requests or one per request."""
        ...

    def update_weights(self, model: Any) -> None:
        """Make the next `generate` sample from `model`'s current weights."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, memory); it cannot generate afterwards."""
        ...
