"""Format rewards of the R1 recipe: the completion is ``<think>...</think>`` then ``<answer>...</answer>``.

``format`` is all-or-nothing and strict (one of each tag, in order, nothing after ``</answer>``);
``tag_count`` gives partial credit while a model is still learning the tags.
"""

from __future__ import annotations

from typing import Any

from rewards.base import RewardFn, Score, completion_text, named
from rewards.extract import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from rewards.registry import register

TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def _with_opening(text: str, think_in_prompt: bool) -> str:
    """Put back the ``<think>`` that a chat template wrote at the end of the prompt."""
    return THINK_OPEN + text if think_in_prompt and not text.lstrip().startswith(THINK_OPEN) else text


def is_r1_format(text: str, *, think_in_prompt: bool = False) -> bool:
    """Return True if ``text`` is exactly ``<think>REASONING</think> <answer>ANSWER</answer>``.

    Each of the four tags occurs once and in that order; only whitespace may come before
    ``<think>``, between ``</think>`` and ``<answer>``, and after ``</answer>``; the answer is not
    empty. With ``think_in_prompt`` the completion may start inside the reasoning (the prompt ended
    with ``<think>``).
    """
    text = _with_opening(text, think_in_prompt)
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    t0, t1, a0, a1 = (text.find(tag) for tag in TAGS)
    if not t0 < t1 < a0 < a1:
        return False
    if (
        text[:t0].strip()
        or text[t1 + len(THINK_CLOSE) : a0].strip()
        or text[a1 + len(ANSWER_CLOSE) :].strip()
    ):
        return False
    return bool(text[a0 + len(ANSWER_OPEN) : a1].strip())


def tag_count_score(text: str, *, think_in_prompt: bool = False) -> float:
    """Return 0.25 for each of ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` that occurs exactly once."""
    text = _with_opening(text, think_in_prompt)
    return 0.25 * sum(text.count(tag) == 1 for tag in TAGS)


@register("format", aliases=("r1_format",))
def make_format_reward(think_in_prompt: bool = False) -> RewardFn:
    """Build the R1 format reward: 1.0 if the completion passes :func:`is_r1_format`, else 0.0.

    Args:
        think_in_prompt: the chat template already opened ``<think>`` in the prompt.
    """

    def format_reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        return [float(is_r1_format(completion_text(c), think_in_prompt=think_in_prompt)) for c in completions]

    return named(format_reward, "format", make_format_reward.__doc__)


@register("tag_count")
def make_tag_count_reward(think_in_prompt: bool = False) -> RewardFn:
    """Build the tag-count reward: partial credit in [0, 1], see :func:`tag_count_score`."""

    def tag_count(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        return [tag_count_score(completion_text(c), think_in_prompt=think_in_prompt) for c in completions]

    return named(tag_count, "tag_count", make_tag_count_reward.__doc__)
