"""Group-relative advantages, the weighted reward sum and DAPO's dynamic-sampling mask, against values
worked out by hand."""

import math

import pytest
import torch

from grpo.advantages import EPS, combine_rewards, group_advantages, groups_with_signal

# Two groups of G = 3, flat and ordered group by group: the first has signal, the second not.
REWARDS = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])


def test_group_scaling_divides_by_each_groups_unbiased_std():
    out = group_advantages(REWARDS, 3, scale_rewards="group")
    # group 1: mean 1, deviations (-1, 0, 1), unbiased variance (1 + 0 + 1) / (3 - 1) = 1, std 1
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0]
    assert out.advantages.shape == (6,)
    assert out.advantages.tolist() == pytest.approx(expected, abs=1e-7)
    assert out.group_mean.tolist() == pytest.approx([1.0, 5.0])
    assert out.group_std.tolist() == pytest.approx([1.0, 0.0])


def test_group_scaling_with_an_uneven_group():
    out = group_advantages(torch.tensor([[0.0, 0.0, 3.0]]), scale_rewards="group")
    # mean 1, deviations (-1, -1, 2), unbiased variance (1 + 1 + 4) / 2 = 3
    std = math.sqrt(3)
    assert out.advantages.shape == (1, 3)
    assert out.advantages[0].tolist() == pytest.approx([-1 / (std + EPS), -1 / (std + EPS), 2 / (std + EPS)])


def test_batch_scaling_centres_on_the_group_and_divides_by_the_batch_std():
    out = group_advantages(REWARDS, 3, scale_rewards="batch")
    # all six: mean 3, deviations (-3, -2, -1, 2, 2, 2), squares sum to 26, unbiased variance 26 / 5
    std = math.sqrt(26 / 5)
    expected = [-1 / (std + EPS), 0.0, 1 / (std + EPS), 0.0, 0.0, 0.0]
    assert out.advantages.tolist() == pytest.approx(expected, abs=1e-7)
    assert out.metrics["reward_std"].item() == pytest.approx(std)


def test_no_scaling_is_dr_grpo_reward_minus_group_mean():
    out = group_advantages(REWARDS.view(2, 3), scale_rewards="none")
    assert out.advantages.tolist() == [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_metrics_frac_reward_zero_std_and_reward():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.0]])
    out = group_advantages(rewards, scale_rewards="group")
    assert out.metrics["frac_reward_zero_std"].item() == 0.5  # groups 0 and 2
    assert out.metrics["reward"].item() == pytest.approx(6.0 / 8)
    # group stds (unbiased, G = 2): 0, sqrt(0.5), 0, sqrt(2)
    assert out.metrics["reward_std"].item() == pytest.approx((math.sqrt(0.5) + math.sqrt(2)) / 4)
    assert out.has_signal.tolist() == [False, True, False, True]


def test_equal_rewards_give_exactly_zero_advantages_whatever_the_float_rounding():
    # The float32 mean of three 0.78379859 is one ulp off (and torch.std is not 0), so the plain formula
    # gives advantages of about 6e-4 for this group; they must be exactly 0.
    rewards = torch.tensor([0.7837985890347726] * 3 + [0.7] * 3 + [1 / 3] * 3)
    first = rewards[:3]
    assert ((first - first.mean()) / (first.std() + EPS)).abs().max() > 1e-4
    for scale in ("group", "batch", "none"):
        out = group_advantages(rewards, 3, scale_rewards=scale)
        assert torch.equal(out.advantages, torch.zeros(9)), scale
        assert out.metrics["frac_reward_zero_std"].item() == 1.0


def test_integer_rewards_and_float64_keep_sensible_dtypes():
    assert group_advantages(torch.tensor([0, 1, 1, 1]), 2).advantages.dtype == torch.float32
    assert (
        group_advantages(torch.tensor([0.0, 1.0], dtype=torch.float64), 2).advantages.dtype == torch.float64
    )


def test_bad_shapes_and_options_are_refused():
    with pytest.raises(ValueError):
        group_advantages(REWARDS)  # flat without group_size
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError):
        group_advantages(REWARDS.view(2, 3), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3, 1))  # G = 1
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 3, scale_rewards="global")


def test_groups_with_signal_is_the_dynamic_sampling_mask():
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.0, -0.0, 0.0], [0.0, 0.0, 1e-6]]
    )
    assert groups_with_signal(rewards).tolist() == [False, True, False, False, True]
    assert groups_with_signal(rewards.reshape(-1), 3).tolist() == [False, True, False, False, True]


def test_combine_rewards_weights_the_functions_and_counts_none_as_zero():
    nan = float("nan")
    per_function = torch.tensor([[1.0, nan], [nan, nan], [0.5, 2.0], [-1.0, 4.0]])
    weights = torch.tensor([1.0, 0.5])
    # 1*1 + (None -> 0); all None -> 0; 1*0.5 + 0.5*2; 1*(-1) + 0.5*4
    assert combine_rewards(per_function, weights).tolist() == [1.0, 0.0, 1.5, 1.0]
    with pytest.raises(ValueError):
        combine_rewards(per_function, torch.ones(3))
