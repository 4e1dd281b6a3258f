"""From rewards to GRPO advantages: the weighted sum of the reward functions, the group-relative
advantage (R - group mean) / (std + eps) with TRL's `scale_rewards` choices, and DAPO's dynamic-sampling
filter. Pure functions of tensors; nothing here needs gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Added to the standard deviation before dividing, as TRL does, so a group of (nearly) equal rewards
#: gives advantages of (nearly) zero instead of dividing by zero.
EPS = 1e-4


@dataclass
class GroupAdvantages:
    """What `group_advantages` returns.

    advantages:   the same shape as the rewards given ([N] or [num_groups, G]), in the same order.
    group_mean:   [num_groups] each group's mean reward.
    group_std:    [num_groups] each group's unbiased standard deviation (torch.std's default, as TRL).
    has_signal:   [num_groups] bool, True where the group's rewards are not all equal (see
                  `groups_with_signal`); groups without signal have advantages of exactly zero.
    metrics:      TRL's names, 0-dim float tensors (`.item()` them to log):
                  "reward" (mean reward), "reward_std" (the mean of the group stds; the batch std when
                  scale_rewards="batch", as TRL logs it) and "frac_reward_zero_std" (the fraction of groups
                  whose rewards are all equal).
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    has_signal: torch.Tensor
    metrics: dict[str, torch.Tensor]


# ----- the registry of advantage estimators -----------------------------------------------------------------
#: An estimator maps (rewards [num_groups, G], their group means [num_groups], group stds [num_groups], eps)
#: to (advantages [num_groups, G], the reward std to log); `group_advantages` then zeroes the groups
#: without signal.
AdvantageEstimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]

#: algorithm.scale_rewards -> its estimator; the recipe's allowed values are these keys.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register an estimator (see `AdvantageEstimator`) as `algorithm.scale_rewards: name`."""

    def register(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"an advantage estimator named {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


@register_advantage_estimator("group")
def group_scaled(grouped: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor, eps: float):
    """GRPO (DeepSeekMath): A = (R - group mean) / (group std + eps)."""
    return (grouped - group_mean[:, None]) / (group_std[:, None] + eps), group_std.mean()


@register_advantage_estimator("batch")
def batch_scaled(grouped: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor, eps: float):
    """A = (R - group mean) / (batch std + eps): the std of all rewards in the batch, the mean the group's."""
    batch_std = grouped.std()
    return (grouped - group_mean[:, None]) / (batch_std + eps), batch_std


@register_advantage_estimator("none")
def unscaled(grouped: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor, eps: float):
    """Dr. GRPO: A = R - group mean, no division by a std."""
    return grouped - group_mean[:, None], group_std.mean()


def _grouped(rewards: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Return `rewards` as [num_groups, G]: a 2-D tensor as is, a flat one cut into groups of `group_size`."""
    if rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)} but group_size={group_size}")
        grouped = rewards
    elif rewards.dim() == 1:
        if group_size is None:
            raise ValueError("flat rewards need group_size (the number of completions per prompt)")
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
        grouped = rewards.view(-1, group_size)
    else:
        raise ValueError(f"rewards must be [N] or [num_groups, G], got shape {tuple(rewards.shape)}")
    if grouped.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 completions per group")
    return grouped


def combine_rewards(per_function: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return the weighted sum of the reward functions for each completion.

    per_function: [B, F] the score of each of F reward functions, NaN where the function returned None
                  (not applicable to that sample, or failed).
    weights:      [F] the functions' weights.
    Returns [B]: sum_f weights[f] * per_function[b, f] over the functions that are not NaN, so None counts
    as 0 (TRL's `nansum`, and what `rewards.RewardScores.total` does); a row that is all NaN gives 0.
    Infinite scores are kept as they are.
    """
    if per_function.dim() != 2 or weights.shape != (per_function.shape[1],):
        raise ValueError(
            f"need per_function [B, F] and weights [F], got {tuple(per_function.shape)} and {tuple(weights.shape)}"
        )
    scores = torch.where(per_function.isnan(), torch.zeros_like(per_function), per_function)
    return (scores * weights.to(scores)).sum(dim=1)


def groups_with_signal(rewards: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Return bool [num_groups]: True where a group's rewards are not all equal (exact comparison).

    rewards: [num_groups, G], or flat [num_groups * G] ordered group by group with `group_size` given.
    A group whose rewards are all equal has zero advantages and so no policy gradient; DAPO's dynamic
    sampling keeps only the groups where this is True (and samples more prompts to refill the batch).
    """
    grouped = _grouped(rewards, group_size)
    return grouped.amax(dim=1) != grouped.amin(dim=1)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int | None = None,
    *,
    scale_rewards: str = "group",
    eps: float = EPS,
) -> GroupAdvantages:
    """Return GRPO's group-relative advantages of `rewards`.

    rewards: [num_groups * G] ordered group by group (the G completions of the first prompt, then the
             second's, ...) with `group_size` = G, or [num_groups, G].
    scale_rewards: a key of `ADVANTAGE_ESTIMATORS`:
        "group": A = (R - group mean) / (group std + eps)   (GRPO, DeepSeekMath)
        "batch": A = (R - group mean) / (batch std + eps), the std of all rewards in the batch
                 (the mean is still the group's)
        "none":  A = R - group mean                          (Dr. GRPO: no division by the std)
    The std is the unbiased one (torch.std's default, divisor G - 1, resp. N - 1 for "batch"), as in TRL.
    eps is 1e-4, as in TRL. A group whose rewards are all equal gets advantages of exactly 0 (the mean of
    equal floats can differ from them in the last bit, which the division would otherwise magnify).
    For "batch", pass the rewards of the whole global batch (all ranks): its std is a batch statistic.
    """
    if scale_rewards not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"scale_rewards must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {scale_rewards!r}")
    grouped = _grouped(rewards, group_size)
    grouped = grouped.to(torch.promote_types(grouped.dtype, torch.float32))  # ints -> float32, float64 kept
    group_mean = grouped.mean(dim=1)
    group_std = grouped.std(dim=1)
    has_signal = groups_with_signal(grouped)
    advantages, reward_std = ADVANTAGE_ESTIMATORS[scale_rewards](grouped, group_mean, group_std, eps)
    advantages = torch.where(has_signal[:, None], advantages, torch.zeros_like(advantages))
    metrics = {
        "reward": grouped.mean().detach(),
        "reward_std": reward_std.detach(),
        "frac_reward_zero_std": (~has_signal).float().mean(),
    }
    return GroupAdvantages(advantages.reshape(rewards.shape), group_mean, group_std, has_signal, metrics)
