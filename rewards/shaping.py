"""Shaping rewards that look at a completion's length, repetition and language rather than its answer.

- ``cosine_length``: cosine-scaled length reward (Yeo et al. 2025, "Demystifying Long Chain-of-Thought"):
  short correct answers earn most, long wrong ones are penalised least.
- ``kimi_length``: length penalty of Kimi k1.5, relative to the other completions of the same prompt.
- ``overlong``: DAPO's soft overlong punishment near and past the length limit.
- ``repetition``: n-gram repetition penalty.
- ``language_consistency``: DeepSeek-R1's share of target-language words in the reasoning.
- ``malformed_tool_calls``: a penalty per tool call that could not be read (the ``tool_calls`` column).

Lengths are token counts when the trainer passes ``completion_ids`` and characters otherwise.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import defaultdict
from typing import Any

from rewards.base import RewardFn, Score, column, completion_text, named, prompt_key, token_lengths
from rewards.extract import THINK_CLOSE, THINK_OPEN
from rewards.registry import register


def _correctness(
    correctness: str, prompts: list[Any], completions: list[Any], completion_ids: Any, columns: dict[str, Any]
) -> list[Score]:
    from rewards.registry import resolve
    from rewards.runner import call_reward

    return call_reward(resolve(correctness), prompts, completions, completion_ids, columns)


def cosine_scale(length: int, max_length: int, value_at_zero: float, value_at_max: float) -> float:
    """Interpolate from ``value_at_zero`` (length 0) to ``value_at_max`` (``max_length``) along a half cosine."""
    progress = min(max(length, 0), max_length) / max_length
    return value_at_max + 0.5 * (value_at_zero - value_at_max) * (1.0 + math.cos(math.pi * progress))


@register("cosine_length")
def make_cosine_length_reward(
    max_length: int = 1000,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    exceed_value: float = -1.0,
    correctness: str = "accuracy",
) -> RewardFn:
    """Build the cosine-scaled length reward.

    A correct completion scores ``max_value_correct`` at length 0 falling to ``min_value_correct``
    at ``max_length``; a wrong one scores ``min_value_wrong`` at length 0 rising to
    ``max_value_wrong`` (long attempts at hard problems are penalised less); past ``max_length``
    it scores ``exceed_value``. ``correctness`` names the reward that decides right or wrong
    (score >= 1 is right); a None there gives None here.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")

    def cosine_length(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        correct = _correctness(correctness, prompts, completions, completion_ids, columns)
        scores: list[Score] = []
        for length, ok in zip(token_lengths(completions, completion_ids), correct):
            if ok is None:
                scores.append(None)
            elif length > max_length:
                scores.append(exceed_value)
            elif ok >= 1.0:
                scores.append(cosine_scale(length, max_length, max_value_correct, min_value_correct))
            else:
                scores.append(cosine_scale(length, max_length, min_value_wrong, max_value_wrong))
        return scores

    return named(cosine_length, "cosine_length", make_cosine_length_reward.__doc__)


@register("kimi_length")
def make_kimi_length_reward(correctness: str = "accuracy") -> RewardFn:
    """Build Kimi k1.5's length penalty, computed within each prompt's group of completions.

    With ``lambda = 0.5 - (len - min_len) / (max_len - min_len)`` over the group, a correct
    completion scores ``lambda`` and a wrong one ``min(0, lambda)``; all 0 when every length is equal.
    ``correctness`` names the reward that decides right (score >= 1) or wrong.
    """

    def kimi_length(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        correct = _correctness(correctness, prompts, completions, completion_ids, columns)
        lengths = token_lengths(completions, completion_ids)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[prompt_key(prompt)].append(i)
        scores: list[Score] = [0.0] * len(completions)
        for members in groups.values():
            shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
            for i in members:
                lam = 0.0 if longest == shortest else 0.5 - (lengths[i] - shortest) / (longest - shortest)
                scores[i] = None if correct[i] is None else (lam if correct[i] >= 1.0 else min(0.0, lam))
        return scores

    return named(kimi_length, "kimi_length", make_kimi_length_reward.__doc__)


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_length - cache_length``, then linear to -1 at ``max_length``, -1 beyond."""
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / cache_length
    return -1.0


@register("overlong")
def make_overlong_reward(max_length: int = 4096, cache_length: int = 1024) -> RewardFn:
    """Build DAPO's soft overlong punishment (see :func:`overlong_penalty`); lengths in tokens.

    Args:
        max_length: the generation limit (L_max); set it to the recipe's max completion length.
        cache_length: the soft band before it (L_cache) where the penalty grows linearly.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}"
        )

    def overlong(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        return [
            overlong_penalty(n, max_length, cache_length) for n in token_lengths(completions, completion_ids)
        ]

    return named(overlong, "overlong", make_overlong_reward.__doc__, full_marks=0.0)


def repetition_penalty(text: str, ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """Return ``max_penalty * (1 - distinct n-grams / n-grams)`` over lower-cased words; 0 for short texts."""
    words = text.lower().split()
    if len(words) < ngram_size:
        return 0.0
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))


@register("repetition")
def make_repetition_reward(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """Build the n-gram repetition penalty (see :func:`repetition_penalty`); scores lie in [max_penalty, 0]."""
    if ngram_size < 1:
        raise ValueError(f"ngram_size must be at least 1, got {ngram_size}")
    if max_penalty > 0:
        raise ValueError(f"max_penalty is a penalty and must be <= 0, got {max_penalty}")

    def repetition(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        return [repetition_penalty(completion_text(c), ngram_size, max_penalty) for c in completions]

    return named(repetition, "repetition", make_repetition_reward.__doc__, full_marks=0.0)


SCRIPTS = {
    "latin": ("LATIN",),
    "han": ("CJK",),
    "japanese": ("HIRAGANA", "KATAKANA", "CJK"),
    "hangul": ("HANGUL",),
    "cyrillic": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",),
    "devanagari": ("DEVANAGARI",),
    "thai": ("THAI",),
}
LANGUAGE_SCRIPTS = {
    **{code: "latin" for code in ("en", "fr", "de", "es", "it", "pt", "nl", "id", "vi", "tr", "pl", "sv")},
    "zh": "han",
    "ja": "japanese",
    "ko": "hangul",
    "ru": "cyrillic",
    "uk": "cyrillic",
    "el": "greek",
    "ar": "arabic",
    "he": "hebrew",
    "hi": "devanagari",
    "th": "thai",
}
"""Language code -> the script its words are written in; languages sharing a script are not told apart."""

_WORD = re.compile(r"[^\W\d_]+")


def _char_script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for script, prefixes in SCRIPTS.items():
        if script != "japanese" and name.startswith(prefixes):
            return script
    if name.startswith(("HIRAGANA", "KATAKANA")):
        return "kana"
    return "other"


def _words_by_script(text: str) -> list[str]:
    """Split ``text`` into words, each labelled with its script (characters of unspaced scripts count singly)."""
    labels: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group(0)
        run: list[str] = []
        for ch in word:
            script = _char_script(ch)
            if script in ("han", "kana", "thai"):
                labels.append(script)
            elif not run or run[-1] != script:
                run.append(script)
                labels.append(script)
    return labels


def language_share(text: str, language: str = "en") -> float | None:
    """Return the share of words in ``text`` written in ``language``'s script; None if there are no words."""
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; allowed: {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    script = LANGUAGE_SCRIPTS[language]
    labels = _words_by_script(text)
    if not labels:
        return None
    accepted = {"han", "kana"} if script == "japanese" else {script}
    return sum(label in accepted for label in labels) / len(labels)


def reasoning_text(text: str) -> str:
    """Return the reasoning: what lies between ``<think>`` and ``</think>`` (the whole text when untagged)."""
    end = text.find(THINK_CLOSE)
    start = text.find(THINK_OPEN)
    if end < 0:
        return text[start + len(THINK_OPEN) :] if start >= 0 else text
    return text[start + len(THINK_OPEN) if 0 <= start < end else 0 : end]


@register("language_consistency")
def make_language_reward(language: str = "en", language_column: str | None = None) -> RewardFn:
    """Build R1's language-consistency reward: the share of ``language`` words in the reasoning.

    Args:
        language: language code (see :data:`LANGUAGE_SCRIPTS`); judged by script.
        language_column: column giving each sample's language code instead (e.g. multilingual data).

    Scores lie in [0, 1]; None when the reasoning has no words.
    """
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; allowed: {', '.join(sorted(LANGUAGE_SCRIPTS))}")

    def language_consistency(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        codes = (
            column(columns, (language_column,), len(completions), "language_consistency")
            if language_column
            else [language] * len(completions)
        )
        return [
            language_share(reasoning_text(completion_text(c)), code) for c, code in zip(completions, codes)
        ]

    return named(language_consistency, "language_consistency", make_language_reward.__doc__)


__all__ = [
    "LANGUAGE_SCRIPTS",
    "cosine_scale",
    "language_share",
    "make_cosine_length_reward",
    "make_kimi_length_reward",
    "make_language_reward",
    "make_overlong_reward",
    "make_repetition_reward",
    "overlong_penalty",
    "reasoning_text",
    "repetition_penalty",
]


@register("malformed_tool_calls")
def make_malformed_tool_calls_reward(penalty: float = -0.5) -> RewardFn:
    """Build the penalty for tool calls that could not be read (bad JSON, an unknown tool): ``penalty`` per
    such call, from the ``tool_calls`` column a tool-using trainer passes (each call a dict with ``malformed``)."""
    if penalty > 0:
        raise ValueError(f"penalty must be <= 0, got {penalty}")

    def malformed_tool_calls(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        calls = column(columns, ["tool_calls"], len(completions), "malformed_tool_calls")
        return [penalty * sum(bool(c.get("malformed")) for c in (cs or [])) for cs in calls]

    return named(malformed_tool_calls, "malformed_tool_calls", make_malformed_tool_calls_reward.__doc__,
                 full_marks=0.0)
