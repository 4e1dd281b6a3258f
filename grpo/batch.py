"""One step's rollouts as the trainer handles them. `Rollout` holds P prompts x G completions, flattened group
by group, and knows how to keep some of its groups, join with other rollouts and cut itself into padded
micro-batches; `RolloutStats` is the few numbers per completion that the ranks exchange."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .advantages import groups_with_signal


@dataclass
class Rollout:
    """One step's generations, flattened group by group: P prompts x G completions."""

    prompt_ids: list[list[int]]  # [P*G]
    completion_ids: list[list[int]]  # [P*G]
    rollout_logprobs: list[list[float]]  # [P*G]
    finish_reasons: list[str]
    rewards: torch.Tensor  # [P*G] weighted total
    per_function: dict[str, list[float | None]]
    texts: list[str]
    prompts: list[str]
    routing: list[torch.Tensor | None]  # [P*G] each [prompt + completion - 1, M, K] with routing replay, else None
    # Tool episodes (grpo.rollout.episodes): per completion, which tokens are tool output (None: none are),
    # its calls, its failed calls and the seconds its calls ran.
    tool_masks: list[list[bool] | None] = dataclasses.field(default_factory=list)
    tool_calls: list[int] = dataclasses.field(default_factory=list)
    tool_errors: list[int] = dataclasses.field(default_factory=list)
    tool_seconds: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        for name, empty in (("tool_masks", None), ("tool_calls", 0), ("tool_errors", 0), ("tool_seconds", 0.0)):
            if not getattr(self, name):
                setattr(self, name, [empty] * n)

    def select(self, idx: list[int]) -> Rollout:
        """The completions at positions `idx`, in that order."""

        def take(column: Any) -> Any:
            if isinstance(column, torch.Tensor):
                return column[idx] if idx else column[:0]
            if isinstance(column, dict):
                return {k: [v[i] for i in idx] for k, v in column.items()}
            return [column[i] for i in idx]

        return Rollout(**{f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def select_groups(self, groups: list[int], group_size: int) -> Rollout:
        """The completions of groups `groups` (each `group_size` completions), in that order."""
        return self.select([g * group_size + k for g in groups for k in range(group_size)])

    def groups_with_signal(self, group_size: int) -> list[int]:
        """The groups whose rewards are not all equal (DAPO's dynamic sampling keeps these)."""
        return [g for g, keep in enumerate(groups_with_signal(self.rewards, group_size).tolist()) if keep]

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        """The parts one after the other."""

        def join(columns: list[Any]) -> Any:
            if isinstance(columns[0], torch.Tensor):
                return torch.cat(columns)
            if isinstance(columns[0], dict):
                return {k: [x for c in columns for x in c[k]] for k in columns[0]}
            return [x for c in columns for x in c]

        return Rollout(**{f.name: join([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Rollout)})

    def micro_batch(self, rows: list[int], mask_truncated: bool = False, routing_replay: bool = False,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded sequences and the completion-aligned gather index for the completions `rows`:
        ids [B, L], targets / mask / where / rollout_logprobs [B, T], token_index [N], routing [B, L, M, K],
        all on `device` (the policy's). mask_truncated: completions stopped by the length limit count no token.
        Tool-output tokens count none (no policy loss, no KL) but stay in ids, where they condition the tokens
        after them."""
        seqs = [self.prompt_ids[i] + self.completion_ids[i] for i in rows]
        L = max(len(s) for s in seqs)
        T = max(len(self.completion_ids[i]) for i in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        targets = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        where = torch.zeros(len(rows), T, dtype=torch.long)
        rollout_lp = torch.zeros(len(rows), T)
        # The real tokens' flat positions: the feed-forward layers skip the right padding (a fifth of the
        # tokens at 32 completion tokens, half at 128, where completions stop at EOS).
        token_index = torch.cat([b * L + torch.arange(len(s)) for b, s in enumerate(seqs)])
        for b, i in enumerate(rows):
            p, c = len(self.prompt_ids[i]), len(self.completion_ids[i])
            ids[b, : p + c] = torch.tensor(seqs[b])
            targets[b, :c] = torch.tensor(self.completion_ids[i])
            mask[b, :c] = True
            if self.tool_masks[i] is not None:
                mask[b, :c] &= ~torch.tensor(self.tool_masks[i], dtype=torch.bool)
            where[b] = (p - 1 + torch.arange(T)).clamp(max=L - 1)  # the position that predicts token t
            rollout_lp[b, :c] = torch.tensor(self.rollout_logprobs[i])
            if mask_truncated and self.finish_reasons[i] == "length":
                mask[b] = False
        batch = {"ids": ids, "targets": targets, "mask": mask, "where": where, "rollout_logprobs": rollout_lp,
                 "token_index": token_index}
        if routing_replay and self.routing[rows[0]] is not None:
            _, M, K = self.routing[rows[0]].shape
            routing = torch.full((len(rows), L, M, K), -1, dtype=torch.int16)  # -1: padding, the gate chooses
            for b, i in enumerate(rows):
                routing[b, : len(self.routing[i])] = self.routing[i]
            batch["routing"] = routing
        # Filled row by row on the host from Python lists, then one copy per tensor: filling on a GPU would
        # be a small host-to-device copy per row.
        return {k: v.to(device) for k, v in batch.items()}


@dataclass
class RolloutStats:
    """What the ranks exchange about their rollouts each step: a few numbers per completion, in order."""

    rewards: torch.Tensor  # [n]
    per_function: dict[str, list[float | None]]  # each [n]
    lengths: list[int]  # [n] completion tokens
    truncated: list[bool]  # [n] stopped by max_completion_length
    tokens: int  # the tokens the loss counts (truncated ones masked out when asked)
    stats: dict[str, float]  # dynamic sampling's
    tool_calls: list[int] = dataclasses.field(default_factory=list)  # [n]
    tool_errors: list[int] = dataclasses.field(default_factory=list)  # [n]
    tool_seconds: list[float] = dataclasses.field(default_factory=list)  # [n]
    tool_tokens: list[int] = dataclasses.field(default_factory=list)  # [n] tool-output tokens (in lengths, no loss)

    @staticmethod
    def of(ro: Rollout, tokens: int, stats: dict[str, float]) -> RolloutStats:
        return RolloutStats(ro.rewards, ro.per_function, [len(c) for c in ro.completion_ids],
                            [f == "length" for f in ro.finish_reasons], tokens, stats,
                            list(ro.tool_calls), list(ro.tool_errors), list(ro.tool_seconds),
                            [sum(m) if m else 0 for m in ro.tool_masks])

    @staticmethod
    def concat(parts: list[RolloutStats]) -> RolloutStats:
        """The global batch: the ranks' parts in rank order (the order of the sampler's global batch)."""
        if len(parts) == 1:
            return parts[0]
        return RolloutStats(torch.cat([p.rewards for p in parts]),
                            {k: [x for p in parts for x in p.per_function[k]] for k in parts[0].per_function},
                            [x for p in parts for x in p.lengths], [x for p in parts for x in p.truncated],
                            sum(p.tokens for p in parts), {}, [x for p in parts for x in p.tool_calls],
                            [x for p in parts for x in p.tool_errors], [x for p in parts for x in p.tool_seconds],
                            [x for p in parts for x in p.tool_tokens])
