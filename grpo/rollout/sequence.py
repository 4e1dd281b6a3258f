"""One sequence being generated: its tokens, where its latents live, and how it is sampled."""

from __future__ import annotations

import enum
import itertools

import torch

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # needs a prefill (a new prompt, or a preempted sequence to recompute)
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, request_index: int = -1,
                 sample_index: int = -1, seed: int | None = None):
        self.seq_id = next(Sequence._ids)
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.params = params
        self.request_index, self.sample_index = request_index, sample_index
        self.seed = seed  # the sampling stream's seed (None: greedy)
        self.generator: torch.Generator | None = None  # the generator sampler's state, seeded from seed
        self.logprobs: list[float] = []
        self.block_table: list[int] = []
        self.num_cached = 0  # tokens whose latents are in the cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        # A group's prompt: prefilled once, then forked into these (request, sample) pairs.
        self.fan_out: list[tuple[int, int, SamplingParams]] = []
        # Routing replay: the experts of every token fed so far, in chunks of [t, M MoE layers, K] (int16).
        self.routing: list[torch.Tensor] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.prompt_len

    def append(self, token: int, logprob: float) -> None:
        self.token_ids.append(token)
        self.logprobs.append(logprob)

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, cached={self.num_cached})"
