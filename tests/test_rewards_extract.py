"""Answer extraction: where a completion's final answer is read, and what makes it give none."""

import pytest

from rewards.extract import (
    EXTRACT_MODES,
    answer_tag_content,
    extract_answer,
    extract_answers,
    find_boxed,
    gold_answer_text,
)


def test_answer_tag_content_is_read_from_a_well_formed_completion():
    assert answer_tag_content("<think>2+2</think>\n<answer> 4 </answer>\n") == "4"


@pytest.mark.parametrize(
    "completion",
    [
        "<think>x</think><answer>4</answer> Actually it is 5.",  # text after </answer>
        "<think>x</think><answer>4</answer><answer>5</answer>",  # repeated block
        "<think>x</think><answer><answer>4</answer></answer>",  # nested tags
        "<think>x</think></answer>4<answer>",  # closing tag first
        "<think>x</think><answer>   </answer>",  # empty block
        "<think>x</think><answer>4",  # never closed
    ],
)
def test_malformed_answer_blocks_give_no_answer(completion):
    assert extract_answers(completion, "answer_tag") == []
    assert extract_answers(completion, "auto") == []


def test_answer_outside_the_tags_is_not_read_when_tags_are_used():
    completion = "<think>It is \\boxed{4}.</think> The answer is 4. <answer>I am not sure</answer>"
    assert extract_answers(completion, "auto") == ["I am not sure"]
    assert extract_answers("<think>so 4</think> 4 <answer></answer>", "auto") == []


def test_boxed_answer_inside_the_answer_block_is_preferred_over_the_surrounding_words():
    assert extract_answers("<answer>The answer is \\boxed{\\frac{1}{2}}.</answer>") == ["\\frac{1}{2}"]


def test_several_distinct_boxed_answers_are_all_returned_so_graders_can_refuse_hedging():
    assert extract_answers("So \\boxed{3} or maybe \\boxed{4}", "boxed") == ["3", "4"]
    assert extract_answers("\\boxed{3}. Check: \\boxed{ 3 }", "boxed") == ["3"]


def test_boxed_mode_ignores_boxes_inside_the_reasoning():
    assert extract_answers("<think>try \\boxed{3}</think> final \\boxed{4}", "boxed") == ["4"]


def test_find_boxed_handles_nesting_escapes_fbox_and_bare_tokens():
    text = (
        r"\boxed{\frac{1}{2}} \boxed{\boxed{5}} \fbox{x} \boxed 7$ \boxedfoo{3} \boxed{\{1,2\}} \boxed{open"
    )
    assert find_boxed(text) == ["\\frac{1}{2}", "5", "x", "7", "\\{1,2\\}"]


def test_gsm8k_marker_is_read_from_the_last_marker_line():
    assert extract_answers("work\n#### 3\nmore work\n#### 1,000\n", "gsm8k") == ["1,000"]
    assert extract_answers("no marker here", "gsm8k") == []


def test_auto_mode_falls_back_from_tags_to_boxes_to_gsm8k_marker():
    assert extract_answer("\\boxed{7}", "auto") == "7"
    assert extract_answer("so\n#### 7", "auto") == "7"
    assert extract_answer("just prose, 7", "auto") is None


def test_gold_answer_text_reduces_worked_solutions_to_their_final_answer():
    assert gold_answer_text("She pays 2*9=18.\n#### 18") == "18"
    assert gold_answer_text("Thus $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert gold_answer_text(27.0) == "27.0"
    assert gold_answer_text(" 025 ") == "025"
    assert gold_answer_text("") is None
    assert gold_answer_text(None) is None


def test_unknown_extraction_mode_is_refused_with_the_allowed_modes():
    with pytest.raises(ValueError, match="allowed: " + ", ".join(EXTRACT_MODES)):
        extract_answers("x", "last_box")
