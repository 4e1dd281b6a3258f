"""R1 format rewards: strict ``<think>...</think><answer>...</answer>`` and partial-credit tag counting."""

import pytest

import rewards
from rewards.format import is_r1_format, tag_count_score

GOOD = "<think>\nAdd them: 2 + 2 = 4.\n</think>\n<answer>\n4\n</answer>"


def test_format_reward_gives_full_marks_to_a_well_formed_completion():
    fmt = rewards.get("format")
    assert fmt(prompts=["q"], completions=[GOOD]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        GOOD + "\nI hope this helps!",  # text after </answer>
        "Sure! " + GOOD,  # text before <think>
        "<think>a</think> and so <answer>4</answer>",  # text between the blocks
        "<think>a</think><answer>4</answer><answer>5</answer>",  # repeated answer
        "<think>a<think>b</think></think><answer>4</answer>",  # nested think
        "<think>a</think><answer><answer>4</answer></answer>",  # nested answer
        "<answer>4</answer><think>a</think>",  # wrong order
        "<think>a</think><answer> </answer>",  # empty answer
        "<think>a</think>",  # no answer
        "4",  # no tags at all
    ],
)
def test_format_reward_gives_zero_to_malformed_completions(completion):
    assert is_r1_format(completion) is False
    assert rewards.get("format")(prompts=["q"], completions=[completion]) == [0.0]


def test_format_reward_accepts_a_completion_whose_prompt_opened_the_think_block():
    assert is_r1_format("reasoning</think><answer>4</answer>", think_in_prompt=True)
    assert not is_r1_format("reasoning</think><answer>4</answer>")
    fmt = rewards.get("format", think_in_prompt=True)
    assert fmt(prompts=["q"], completions=["reasoning</think><answer>4</answer>"]) == [1.0]


def test_format_reward_reads_conversational_completions():
    completion = [{"role": "assistant", "content": GOOD}]
    assert rewards.get("format")(prompts=[[{"role": "user", "content": "q"}]], completions=[completion]) == [
        1.0
    ]


def test_tag_count_gives_a_quarter_per_tag_present_exactly_once():
    assert tag_count_score(GOOD) == 1.0
    assert tag_count_score("<think>a</think> 4") == 0.5
    assert tag_count_score("<think><think>a</think><answer>4</answer>") == 0.75
    assert tag_count_score("plain") == 0.0
    assert rewards.get("tag_count")(prompts=["q", "q"], completions=[GOOD, "plain"]) == [1.0, 0.0]
