"""GSM8K-style numeric answers: the completion's final number must equal the gold number exactly.

Numbers are read as exact fractions (``1,000``, ``$18``, ``-3``, ``0.5``, ``3/4``); no math-verify, so
this reward is cheap and runs in-process.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from rewards.base import RewardFn, Score, WarnOnce, column, completion_text, named
from rewards.extract import answer_section, check_mode, extract_answers, gold_answer_text
from rewards.math import GOLD_COLUMNS
from rewards.registry import register

NUMERIC_EXTRACT_MODES = ("auto", "answer_tag", "boxed", "gsm8k", "last_number")
""":data:`rewards.extract.EXTRACT_MODES`, plus ``last_number``: the last number after ``</think>``."""

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])[-+]?\.\d+")
_MAX_NUMBER_CHARS = 60
_warn_gold = WarnOnce()


def parse_number(text: str) -> Fraction | None:
    """Return the exact value of a number written as ``1,000``, ``-3``, ``0.25``, ``.5`` or ``3/4``, else None."""
    text = text.strip()
    if not text or len(text) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
        return None
    text = text.replace(",", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> Fraction | None:
    """Return the value of the last number in ``text`` (see :func:`parse_number`), or None if there is none."""
    for match in reversed(list(_NUMBER.finditer(text))):
        value = parse_number(match.group(0))
        if value is not None:
            return value
    return None


def gold_number(gold: Any) -> Fraction | None:
    """Return the gold answer's value: the ``#### N`` of a GSM8K solution, a number, or a numeric string."""
    text = gold_answer_text(gold)
    if text is None:
        return None
    return parse_number(text.replace("$", "").replace("\\", "").strip())


def predicted_numbers(text: str, extract: str = "auto") -> list[Fraction | None]:
    """Return the number each of the completion's final answers ends with (None for an answer without one)."""
    if extract == "last_number":
        value = last_number(answer_section(text))
        return [] if value is None else [value]
    return [last_number(answer) for answer in extract_answers(text, extract)]


def numbers_match(predictions: Sequence[Fraction | None], gold: Fraction) -> bool:
    """Return True if there is at least one prediction and every one equals ``gold``."""
    return bool(predictions) and all(p == gold for p in predictions)


@register("gsm8k", aliases=("numeric",))
def make_numeric_reward(extract: str = "auto", gold_column: str | None = None) -> RewardFn:
    """Build the GSM8K numeric reward: 1.0 if the final answer's number equals the gold number, else 0.0.

    Args:
        extract: where the answer is read: one of :data:`NUMERIC_EXTRACT_MODES`.
        gold_column: dataset column with the gold answer (a number or a ``#### N`` solution);
            default: the first of :data:`rewards.math.GOLD_COLUMNS` present.

    Scores None for samples whose gold answer is not a number, with a warning once.
    """
    if extract != "last_number":
        check_mode(extract)
    columns_tried = (gold_column,) if gold_column else GOLD_COLUMNS

    def numeric(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        golds = column(columns, columns_tried, len(completions), "gsm8k")
        scores: list[Score] = []
        for completion, gold in zip(completions, golds):
            value = gold_number(gold)
            if value is None:
                _warn_gold(repr(gold), f"gold answer {gold!r} is not a number; its samples score None")
                scores.append(None)
                continue
            scores.append(
                float(numbers_match(predicted_numbers(completion_text(completion), extract), value))
            )
        return scores

    return named(numeric, "gsm8k", make_numeric_reward.__doc__)
