"""Shaping rewards: cosine-scaled length, Kimi length penalty, DAPO overlong, repetition, language."""

import math

import pytest

import rewards
from rewards.shaping import cosine_scale, language_share, overlong_penalty, reasoning_text, repetition_penalty

RIGHT = "<think>{}</think><answer>4</answer>"


def _completion(words):
    return RIGHT.format(" ".join(["step"] * words))


def test_cosine_scale_runs_from_its_start_value_to_its_end_value():
    assert cosine_scale(0, 100, 1.0, 0.5) == pytest.approx(1.0)
    assert cosine_scale(50, 100, 1.0, 0.5) == pytest.approx(0.75)
    assert cosine_scale(100, 100, 1.0, 0.5) == pytest.approx(0.5)


def test_cosine_length_prefers_short_right_answers_and_long_wrong_ones():
    reward = rewards.get("cosine_length", max_length=100)
    ids = [[0] * 10, [0] * 90, [0] * 10, [0] * 90, [0] * 150]
    completions = [RIGHT, RIGHT, "<answer>5</answer>", "<answer>5</answer>", RIGHT]
    scores = reward(prompts=["q"] * 5, completions=completions, completion_ids=ids, answer=["4"] * 5)
    short_right, long_right, short_wrong, long_wrong, too_long = scores
    assert 0.5 <= long_right < short_right <= 1.0
    assert -1.0 <= short_wrong < long_wrong <= -0.5
    assert too_long == -1.0


def test_cosine_length_is_none_where_correctness_is_not_applicable():
    reward = rewards.get("cosine_length")
    assert reward(prompts=["q"], completions=[RIGHT], answer=["}{"]) == [None]


def test_kimi_length_penalty_is_relative_to_the_same_prompts_completions():
    reward = rewards.get("kimi_length")
    prompts = ["p1", "p1", "p1", "p2", "p2"]
    completions = [
        _completion(1),
        _completion(21),
        "<answer>5</answer>" + "x" * 100,
        _completion(5),
        _completion(5),
    ]
    ids = [[0] * 10, [0] * 30, [0] * 12, [0] * 7, [0] * 7]
    scores = reward(prompts=prompts, completions=completions, completion_ids=ids, answer=["4"] * 5)
    assert scores[0] == pytest.approx(0.5)  # shortest, right
    assert scores[1] == pytest.approx(-0.5)  # longest, right
    assert scores[2] == 0.0  # wrong and short (lambda 0.4): min(0, lambda), no bonus
    assert scores[3:] == [0.0, 0.0]  # equal lengths in group p2


def test_overlong_penalty_is_zero_then_linear_then_minus_one():
    assert overlong_penalty(500, 1000, 200) == 0.0
    assert overlong_penalty(800, 1000, 200) == 0.0
    assert overlong_penalty(900, 1000, 200) == pytest.approx(-0.5)
    assert overlong_penalty(1000, 1000, 200) == pytest.approx(-1.0)
    assert overlong_penalty(1001, 1000, 200) == -1.0
    reward = rewards.get("overlong", max_length=10, cache_length=4)
    assert reward(prompts=["q"] * 2, completions=["a", "b"], completion_ids=[[1] * 5, [1] * 8]) == [
        0.0,
        pytest.approx(-0.5),
    ]


def test_repetition_penalty_grows_with_repeated_ngrams():
    fresh = "the quick brown fox jumps over the lazy dog"
    looped = "I think so " * 30
    assert repetition_penalty(fresh) == 0.0
    assert -1.0 <= repetition_penalty(looped) < -0.9
    assert repetition_penalty("too short") == 0.0
    assert rewards.get("repetition")(prompts=["q"], completions=[looped])[0] == pytest.approx(
        repetition_penalty(looped)
    )


def test_language_share_counts_target_script_words_in_the_reasoning():
    assert language_share("we add two and two", "en") == 1.0
    assert language_share("we add 两个 numbers", "en") == pytest.approx(3 / 5)  # each Han character is a word
    assert language_share("我们 add", "zh") == pytest.approx(2 / 3)
    assert language_share("1 + 1 = 2", "en") is None
    with pytest.raises(ValueError, match="allowed: .*en"):
        language_share("x", "klingon")


def test_language_consistency_reward_looks_only_at_the_reasoning():
    reward = rewards.get("language_consistency", language="en")
    completions = [
        "<think>we add them</think><answer>答案</answer>",
        "<think>我们相加</think><answer>four</answer>",
    ]
    assert reward(prompts=["q"] * 2, completions=completions) == [1.0, 0.0]
    assert reasoning_text("<think>abc</think>rest") == "abc"
    assert reasoning_text("no tags") == "no tags"


def test_shaping_scores_are_finite():
    reward = rewards.get("repetition")
    assert all(math.isfinite(s) for s in reward(prompts=["q"] * 3, completions=["", "a", "a a a a"]))
