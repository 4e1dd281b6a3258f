"""Countdown: a safe arithmetic parser; each given number used exactly once; the target reached."""

import time
from fractions import Fraction

import pytest

import rewards
from rewards.countdown import ExpressionError, check_equation, evaluate


def test_evaluate_follows_precedence_and_exact_division():
    assert evaluate("(25 - 5) * 3 + 2") == (Fraction(62), [25, 5, 3, 2])
    assert evaluate("7 / 2 * 4") == (Fraction(14), [7, 2, 4])
    assert evaluate("$6 \\times 4 ÷ 2$ = 12")[0] == 12


def test_a_correct_equation_reaches_the_target_with_each_number_once():
    assert check_equation("(25 - 5) * 3 + 2", [2, 3, 5, 25], 62)
    assert not check_equation("(25 - 5) * 3", [2, 3, 5, 25], 60)  # 2 unused


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("2 ** 10", "power"),
        ("2 ^ 10", "power"),
        ("-3 + 5", "unary"),
        ("2.5 * 4", "'.'"),
        ("1234567 + 1", "digits"),
        ("(" * 30 + "1" + ")" * 30, "nested"),
        ("1 + " * 100 + "1", "characters"),
        ("__import__('os')", "not allowed"),
        ("3 / (2 - 2)", "division by zero"),
        ("1 = 2 = 3", "more than one"),
        ("", "empty"),
    ],
)
def test_unsafe_or_malformed_expressions_are_refused_with_the_reason(expression, reason):
    with pytest.raises(ExpressionError, match=reason):
        evaluate(expression)


@pytest.mark.parametrize(
    "answer",
    [
        "3 + 3 + 4 * 4",  # 3 used twice, 5 unused
        "3 * 5 + 4 + 3",  # 3 used twice
        "(3 + 5) ** 2 / 4",  # power
        "99999999999999999999 - 99999999999999999974",  # huge literals
        "9**9**9**9",  # exponent bomb
        "3 + 5 + 4",  # wrong value
    ],
)
def test_countdown_reward_gives_zero_to_cheating_equations(answer):
    reward = rewards.get("countdown")
    start = time.perf_counter()
    scores = reward(
        prompts=["q"],
        completions=[f"<think>..</think><answer>{answer}</answer>"],
        nums=[[3, 5, 4]],
        target=[26],
    )
    assert scores == [0.0]
    assert time.perf_counter() - start < 0.5


def test_countdown_reward_gives_full_marks_to_a_valid_equation():
    reward = rewards.get("countdown")
    completions = [
        "<think>..</think><answer>3 * 5 + 4 + 7</answer>",
        "<think>..</think><answer>(7 - 3) * 5 + 4 = 24</answer>",
    ]
    scores = reward(prompts=["q"] * 2, completions=completions, nums=[[3, 4, 5, 7]] * 2, target=[26, 24])
    assert scores == [1.0, 1.0]
