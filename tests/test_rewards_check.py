"""check_rewards: gold answers as ideal completions score full marks, shuffled wrong answers zero."""

import json
from pathlib import Path

import pytest

import rewards
from rewards import RewardSet, check_rewards, ideal_completion

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [
    {"prompt": f"What is {a} + {b}?", "answer": str(a + b)}
    for a, b in [(1, 2), (3, 4), (10, 5), (7, 9), (20, 22), (8, 8)]
]


def test_working_rewards_give_full_marks_to_gold_and_zero_to_wrong_answers():
    report = check_rewards([rewards.get("accuracy"), rewards.get("format")], ROWS)
    accuracy, fmt = report.functions
    assert (accuracy.ideal_full, accuracy.wrong_zero) == (len(ROWS), len(ROWS))
    assert fmt.ideal_full == fmt.wrong_full == len(ROWS)  # format does not look at the answer
    assert accuracy.answer_sensitive and not fmt.answer_sensitive
    assert report.problems() == []
    assert "no problems found" in report.format()


def test_a_broken_reward_is_flagged():
    def never(prompts, completions, completion_ids=None, **columns):
        return [0.0] * len(completions)

    def explodes(prompts, completions, completion_ids=None, **columns):
        raise RuntimeError("boom")

    report = check_rewards(
        RewardSet([rewards.get("accuracy", gold_column="solution"), never, explodes]), ROWS
    )
    problems = "\n".join(report.problems())
    assert "accuracy: " in problems  # the column does not exist: every sample errors
    assert f"never: only 0/{len(ROWS)} gold answers get full marks" in problems
    assert "explodes: " in problems and "boom" in problems


def test_check_rewards_on_math500_gold_answers():
    path = DATA / "math500.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (benchmark data is optional)")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:40]]
    report = check_rewards(RewardSet([rewards.get("accuracy")]), rows, n=40)
    (accuracy,) = report.functions
    assert accuracy.ideal_full == 40
    assert accuracy.wrong_full <= report.identical_wrong + 1


def test_ideal_completion_writes_the_final_answer_in_r1_format():
    text = ideal_completion({"answer": "Work.\n#### 1,200"})
    assert rewards.get("format")(prompts=["q"], completions=[text]) == [1.0]
    assert "1,200" in text
    chat = ideal_completion({"answer": "5"}, conversational=True)
    assert chat[0]["role"] == "assistant"
    with pytest.raises(KeyError, match="no column 'answer'"):
        ideal_completion({"solution": "5"})


def test_a_penalty_counts_zero_as_full_marks_and_reads_per_completion_columns():
    seen = []

    def per_completion(completions):
        seen.append(list(completions))
        # The first completion of each batch made a malformed call; the others made none.
        return {"tool_calls": [[{"malformed": True}] if i == 0 else [] for i in range(len(completions))]}

    rows = ROWS
    penalty = rewards.get("malformed_tool_calls", penalty=-1.0)
    report = check_rewards([penalty], rows, completion_columns=per_completion)
    (check,) = report.functions
    # Gold completions: all but the first are clean, so they score 0, a penalty's full marks; the first pays -1.
    assert (check.ideal_full, check.ideal_none) == (len(rows) - 1, 0)
    assert report.problems() == [f"malformed_tool_calls: only {len(rows) - 1}/{len(rows)} gold answers get full marks"]
    assert seen and all(len(batch) == len(rows) for batch in seen)  # the ideal batch, then the wrong one
    assert report.functions[0].errors == []
    without = check_rewards([penalty], rows)  # no tool_calls column: every sample errors, as before
    assert "malformed_tool_calls: " in "\n".join(without.problems())
