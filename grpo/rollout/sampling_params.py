"""How to sample one request's completions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """n: completions per prompt (the GRPO group size G). temperature 0 means greedy.
    top_k 0 and top_p 1 and min_p 0 switch those filters off. Generation stops at max_tokens, at any of
    stop_token_ids or the tokenizer's EOS (kept in the output; `ignore_eos` runs past EOS), or after a stop
    string (the tokens that complete it are kept). seed makes each completion's sampling reproducible,
    whatever else is batched with it."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        """Whether top-k, top-p or min-p cut the distribution before sampling."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0
