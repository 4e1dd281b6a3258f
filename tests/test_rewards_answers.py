"""GSM8K-style numeric answers and multiple-choice answers."""

import json
from fractions import Fraction
from pathlib import Path

import pytest

import rewards
from rewards.choice import choice_letter, extract_choice
from rewards.numeric import gold_number, last_number, parse_number

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", 18),
        ("1,000", 1000),
        ("-3", -3),
        ("0.25", Fraction(1, 4)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
    ],
)
def test_numbers_are_read_exactly(text, value):
    assert parse_number(text) == value


def test_malformed_or_huge_numbers_are_not_numbers():
    assert parse_number("1,00") is None
    assert parse_number("12abc") is None
    assert parse_number("9" * 500) is None


def test_last_number_skips_words_and_keeps_commas():
    assert last_number("She makes $18 a day, so 7 days give $1,260 in total.") == 1260
    assert last_number("no digits") is None


def test_gsm8k_reward_matches_the_final_number_against_the_marker_line():
    reward = rewards.get("gsm8k")
    completions = [
        "<think>16-3-4=9; 9*2=18</think><answer>$18</answer>",
        "<think>..</think><answer>18.00</answer>",
        "<think>..</think><answer>17</answer>",
        "<think>..</think><answer>18</answer> or 17",
    ]
    gold = "Janet sells 9 eggs.\n#### 18"
    assert reward(prompts=["q"] * 4, completions=completions, answer=[gold] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_gsm8k_reward_gives_full_marks_to_every_gold_answer_of_gsm8k_test():
    path = DATA / "gsm8k_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (benchmark data is optional)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    completions = [
        f"<think>...</think><answer>{r['answer'].split('####')[-1].strip()}</answer>" for r in rows
    ]
    scores = rewards.get("gsm8k")(
        prompts=[""] * len(rows), completions=completions, answer=[r["answer"] for r in rows]
    )
    assert [i for i, s in enumerate(scores) if s != 1.0] == []


def test_gsm8k_reward_scores_none_for_a_non_numeric_gold():
    reward = rewards.get("gsm8k")
    assert reward(prompts=["q"], completions=["<answer>5</answer>"], answer=["five apples"]) == [None]
    assert gold_number("#### 1,234") == 1234


def test_gsm8k_last_number_mode_reads_the_last_number_after_the_reasoning():
    reward = rewards.get("gsm8k", extract="last_number")
    assert reward(
        prompts=["q"], completions=["<think>3</think>So the total is 42 apples."], answer=["42"]
    ) == [1.0]


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("\\text{(B)}", "B"),
        ("B) 42 apples", "B"),
        ("(C), not A", "C"),
        ("A or B", None),
        ("F", None),
        ("", None),
    ],
)
def test_choice_letter_reads_a_single_option(answer, letter):
    assert choice_letter(answer, "ABCDE") == letter


def test_multiple_choice_reward_credits_only_the_gold_option():
    reward = rewards.get("multiple_choice")
    completions = [
        "<think>..</think><answer>(C)</answer>",
        "<think>..</think><answer>B</answer>",
        "<think>..</think><answer>B or C</answer>",
        "<think>..</think><answer>C</answer> actually B",
        "Thinking... so the answer is (C).",
        "\\boxed{C}",
    ]
    scores = reward(prompts=["q"] * 6, completions=completions, answer=["C"] * 6)
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_multiple_choice_accepts_a_zero_based_index_as_gold_and_refuses_bad_golds():
    reward = rewards.get("multiple_choice")
    assert reward(prompts=["q", "q"], completions=["<answer>B</answer>"] * 2, answer=[1, "Z"]) == [1.0, None]
    assert extract_choice("The answer is a bit unclear") is None
