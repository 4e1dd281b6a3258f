"""RewardSet: weighted totals, None handling, named errors, timeouts, async and parallel rewards."""

import asyncio
import math
import threading
import time

import pytest

import rewards
from rewards import Reward, RewardError, RewardSet, RewardTimeoutError


def constant(value):
    def reward(prompts, completions, completion_ids=None, **columns):
        return [value] * len(completions)

    reward.__name__ = f"constant_{value}"
    return reward


def only_even(prompts, completions, completion_ids=None, **columns):
    return [1.0 if len(c) % 2 == 0 else None for c in completions]


def fails_on_bad(prompts, completions, completion_ids=None, **columns):
    return [1.0 / (c != "bad") for c in completions]


def test_total_is_the_weighted_sum_and_none_counts_as_zero():
    scores = RewardSet([(constant(1.0), 2.0, "two"), (only_even, 0.5)])(["q"] * 3, ["ab", "abc", "abcd"])
    assert scores.per_function == {"two": [1.0, 1.0, 1.0], "only_even": [1.0, None, 1.0]}
    assert scores.total == [2.5, 2.0, 2.5]


def test_mean_leaves_out_none_scores():
    scores = RewardSet([only_even])(["q"] * 3, ["ab", "abc", "x"])
    assert scores.mean("only_even") == 1.0
    assert RewardSet([only_even])(["q"], ["abc"]).means() == {"only_even": None}


def test_columns_reach_reward_functions_as_trl_passes_them():
    seen = {}

    def spy(prompts, completions, completion_ids=None, **columns):
        seen.update(columns, ids=completion_ids)
        return [0.0] * len(completions)

    RewardSet([spy])(["q"], ["c"], [[1, 2]], answer=["4"], trainer_state=None)
    assert seen == {"answer": ["4"], "trainer_state": None, "ids": [[1, 2]]}


def test_a_failing_reward_is_reported_with_its_name_and_sample_index():
    batch = ["ok", "ok", "bad", "ok"]
    with pytest.raises(RewardError, match=r"'fails_on_bad' failed on sample 2: ZeroDivisionError") as info:
        RewardSet([constant(1.0), fails_on_bad])(["q"] * 4, batch)
    assert info.value.name == "fails_on_bad" and info.value.index == 2


def test_with_on_error_none_failing_samples_score_none_and_the_run_goes_on():
    scores = RewardSet([constant(1.0), fails_on_bad], on_error="none")(["q"] * 3, ["ok", "bad", "ok"])
    assert scores.per_function["fails_on_bad"] == [1.0, None, 1.0]
    assert scores.total == [2.0, 1.0, 2.0]
    assert [(f.name, f.index) for f in scores.failures] == [("fails_on_bad", 1)]


def test_a_hanging_reward_hits_the_timeout():
    release = threading.Event()

    def hangs(prompts, completions, completion_ids=None, **columns):
        release.wait(30)
        return [1.0] * len(completions)

    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="'hangs' failed on the batch: no result after 0.3 s"):
        RewardSet([constant(1.0), hangs], timeout=0.3)(["q"], ["c"])
    scores = RewardSet([hangs], timeout=0.3, on_error="none")(["q"], ["c"])
    assert scores.per_function["hangs"] == [None]
    release.set()
    assert time.monotonic() - start < 5


def test_async_reward_functions_are_awaited():
    async def slow_async(prompts, completions, completion_ids=None, **columns):
        await asyncio.sleep(0.01)
        return [0.5] * len(completions)

    assert RewardSet([slow_async, constant(1.0)])(["q"] * 2, ["a", "b"]).per_function["slow_async"] == [
        0.5,
        0.5,
    ]
    assert rewards.call_reward(slow_async, ["q"], ["a"]) == [0.5]


def test_slow_rewards_run_in_parallel():
    def sleeper(name):
        def reward(prompts, completions, completion_ids=None, **columns):
            time.sleep(0.4)
            return [1.0] * len(completions)

        reward.__name__ = name
        return reward

    start = time.monotonic()
    RewardSet([sleeper("a"), sleeper("b"), sleeper("c")])(["q"], ["c"])
    parallel = time.monotonic() - start
    start = time.monotonic()
    RewardSet([sleeper("a"), sleeper("b"), sleeper("c")], parallel=False)(["q"], ["c"])
    sequential = time.monotonic() - start
    assert parallel < 0.9 < sequential


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ([1.0], "returned 1 scores for 2 completions"),
        ([1.0, math.nan], "nan"),
        ([1.0, "x"], "'x'"),
        (0.5, "float"),
    ],
)
def test_malformed_reward_outputs_are_errors_naming_the_problem(output, message):
    def broken(prompts, completions, completion_ids=None, **columns):
        return output

    with pytest.raises(RewardError, match=message):
        RewardSet([broken])(["q"] * 2, ["a", "b"])


def test_reward_set_refuses_duplicate_names_and_bad_settings():
    with pytest.raises(ValueError, match="two rewards are named"):
        RewardSet([constant(1.0), constant(1.0)])
    with pytest.raises(ValueError, match="on_error must be one of"):
        RewardSet([only_even], on_error="ignore")
    with pytest.raises(ValueError, match="weight must be a finite number"):
        RewardSet([Reward(only_even, math.inf)])


def test_reward_set_from_config_resolves_names_weights_and_options():
    reward_set = RewardSet.from_config(
        ["format", {"reward": "accuracy", "weight": 2.0, "options": {"extract": "answer_tag"}, "name": "acc"}]
    )
    assert reward_set.names == ["format", "acc"] and reward_set.weights == [1.0, 2.0]
    scores = reward_set(["q"], ["<think>a</think><answer>4</answer>"], answer=["4"])
    assert scores.total == [3.0]


def test_combine_is_a_reward_set_over_fn_weight_name_triples():
    combined = rewards.combine([(constant(1.0), 0.5, "half"), (constant(2.0), 1.0, "two")])
    assert combined(["q"], ["c"]).total == [2.5]
