"""Multiple-choice answers: the completion must pick exactly one option letter, the gold one.

The answer is read from the answer block or ``\\boxed{}`` (see :mod:`rewards.extract`), else from a
last "answer is (X)" / "Answer: X" phrase; an answer naming two options ("A or B") picks none.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.base import RewardFn, Score, WarnOnce, column, completion_text, named
from rewards.extract import answer_section, check_mode, extract_answers
from rewards.math import GOLD_COLUMNS
from rewards.registry import register

_LATEX_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textrm|mbox)\s*|[{}$*]")
_ANSWER_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)|:)\s*:?\s*\(?\s*([A-Z])\b\)?")
_LEADING_LETTER = re.compile(r"\(([A-Z])\)|([A-Z])[).:](?=\s|$)")
_ONLY_LETTER = re.compile(r"\(?([A-Z])\)?[.:]?")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])")
_warn_gold = WarnOnce()


def choice_letter(answer: str, letters: str = "ABCDE") -> str | None:
    """Return the single option letter an answer names (``B``, ``(B)``, ``\\text{(B)}``, ``B) 42``), or None.

    None when no allowed letter is named, or two different ones are (unless one leads, as in
    ``(B), not A``).
    """
    text = _LATEX_WRAPPERS.sub("", answer).strip()
    match = _ONLY_LETTER.fullmatch(text) or _LEADING_LETTER.match(text)
    letter = match and next((g for g in match.groups() if g), None)
    if letter and letter in letters:
        return letter
    named_letters = {m.group(1) for m in _STANDALONE.finditer(text)} & set(letters)
    return named_letters.pop() if len(named_letters) == 1 else None


def extract_choice(text: str, extract: str = "auto", letters: str = "ABCDE") -> str | None:
    """Return the option letter a completion picks, or None (see the module docstring)."""
    answers = extract_answers(text, extract)
    if not answers and extract == "auto":
        phrases = list(_ANSWER_PHRASE.finditer(answer_section(text)))
        answers = [phrases[-1].group(1)] if phrases else []
    picks = {choice_letter(a, letters) for a in answers}
    return picks.pop() if len(picks) == 1 else None


def gold_letter(gold: Any, letters: str = "ABCDE") -> str | None:
    """Return the gold option letter: a letter (``"B"``, ``"(B)"``) or a 0-based index (``1`` -> ``B``)."""
    if isinstance(gold, int) and not isinstance(gold, bool):
        return letters[gold] if 0 <= gold < len(letters) else None
    if isinstance(gold, str):
        return choice_letter(gold, letters)
    return None


@register("multiple_choice", aliases=("choice",))
def make_choice_reward(
    extract: str = "auto", gold_column: str | None = None, letters: str = "ABCDE"
) -> RewardFn:
    """Build the multiple-choice reward: 1.0 if the picked letter is the gold one, else 0.0.

    Args:
        extract: where the answer is read (:data:`rewards.extract.EXTRACT_MODES`).
        gold_column: column with the gold letter or 0-based index; default: the first of
            :data:`rewards.math.GOLD_COLUMNS` present.
        letters: the option letters allowed.

    Scores None for samples whose gold is not one of ``letters``, with a warning once.
    """
    check_mode(extract)
    if not letters or not letters.isalpha() or not letters.isupper():
        raise ValueError(f"letters must be capital letters such as 'ABCD', got {letters!r}")
    columns_tried = (gold_column,) if gold_column else GOLD_COLUMNS

    def multiple_choice(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        golds = column(columns, columns_tried, len(completions), "multiple_choice")
        scores: list[Score] = []
        for completion, gold in zip(completions, golds):
            expected = gold_letter(gold, letters)
            if expected is None:
                _warn_gold(
                    repr(gold), f"gold answer {gold!r} is not one of the options {letters}; scoring None"
                )
                scores.append(None)
                continue
            scores.append(float(extract_choice(completion_text(completion), extract, letters) == expected))
        return scores

    return named(multiple_choice, "multiple_choice", make_choice_reward.__doc__)
