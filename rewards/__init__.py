"""Rule-based rewards for RL fine-tuning of reasoning models (the DeepSeek-R1 recipe).

A reward function is ``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]``,
called exactly as TRL calls its reward functions (``columns`` are the dataset's other fields; ``None``
means "not applicable"; ``async def`` functions are accepted). Recipes name rewards from the registry
(:func:`names`) or point to their own (``pkg.mod:fn``, ``path/to/file.py:fn``) via :func:`resolve`;
:class:`RewardSet` runs several with weights, timeouts and error handling; :func:`check_rewards`
checks them on gold and wrong answers before training.
"""

from collections.abc import Iterable
from typing import Any

from rewards.base import RewardFn, Score, completion_text
from rewards.check import CheckReport, FunctionCheck, check_rewards, ideal_completion
from rewards.registry import get, names, options, register, resolve
from rewards.runner import (
    Failure,
    Reward,
    RewardError,
    RewardScores,
    RewardSet,
    RewardTimeoutError,
    call_reward,
)

__all__ = [
    "CheckReport",
    "Failure",
    "FunctionCheck",
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardScores",
    "RewardSet",
    "RewardTimeoutError",
    "Score",
    "call_reward",
    "check_rewards",
    "combine",
    "completion_text",
    "get",
    "ideal_completion",
    "names",
    "options",
    "register",
    "resolve",
]


def combine(rewards: Iterable[Reward | tuple[Any, ...] | RewardFn], **kwargs: Any) -> RewardSet:
    """Return ``RewardSet(rewards, **kwargs)``: ``[(fn, weight, name), ...]`` evaluated together."""
    return RewardSet(rewards, **kwargs)
