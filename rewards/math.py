"""Math accuracy: is the completion's final answer mathematically equal to the gold answer (math-verify)?

This is the one grader of math answers in the project: the ``accuracy`` reward and the evaluation
(pass@k, maj@k grouping by equivalence) both call :func:`grade` / :func:`grade_many`. Answers are
compared as LaTeX, numbers, fractions, sets, intervals, units and percentages by math-verify, in
worker processes (see :mod:`rewards.workers`), because math-verify's timeout needs a main thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from rewards.base import RewardFn, Score, WarnOnce, column, completion_text, named
from rewards.extract import check_mode, extract_answer, extract_answers, gold_answer_text
from rewards.registry import register
from rewards.workers import WorkerPool, shared_pool

__all__ = [
    "GOLD_COLUMNS",
    "answers_equivalent",
    "extract_answer",
    "extract_answers",
    "grade",
    "grade_completion",
    "grade_many",
    "make_accuracy_reward",
]

GOLD_COLUMNS = ("answer", "solution", "gold")
"""Dataset columns tried, in order, for the gold answer when a reward is not told which to use."""

DEFAULT_TIMEOUT_S = 5.0
_PRELOAD = ("rewards.math", "math_verify")
_INTEGER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_warn_gold = WarnOnce()


def _pool(pool: WorkerPool | None) -> WorkerPool:
    return pool if pool is not None else shared_pool(_PRELOAD)


def _as_integer(answer: str) -> int | None:
    """Return ``answer`` as an int if it is a plain integer (``-12``, ``1,000``), else None."""
    text = answer.strip()
    if len(text) > 40 or not _INTEGER.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def _grade_fast(candidates: Sequence[str], gold: str) -> bool | None:
    """Grade integer-only answers exactly in this process; None when math-verify is needed."""
    gold_int = _as_integer(gold)
    if gold_int is None:
        return None
    values = [_as_integer(c) for c in candidates]
    if not values or any(v is None for v in values):
        return None
    return all(v == gold_int for v in values)


def _parse_in_worker(answer: str, timeout_s: int) -> list[Any]:
    """Parse one answer with math-verify (worker side). Bare answers are read as one LaTeX expression."""
    from math_verify import parse

    text = answer.strip()
    if not (_UNESCAPED_DOLLAR.search(text) or "\\(" in text or "\\[" in text):
        text = "\\boxed{" + text + "}"
    return parse(text, parsing_timeout=timeout_s)


def _verify_in_worker(candidates: list[str], gold: str, timeout_s: int) -> bool | None:
    """Worker task: True if every candidate equals ``gold``; None if ``gold`` cannot be parsed."""
    import logging

    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = _parse_in_worker(gold, timeout_s)
    if not gold_parsed:
        return None
    if not candidates:
        return False
    for candidate in candidates:
        parsed = _parse_in_worker(candidate, timeout_s)
        if not parsed or not verify(gold_parsed, parsed, timeout_seconds=timeout_s):
            return False
    return True


def grade_many(
    predictions: Sequence[str | Sequence[str] | None],
    golds: Sequence[Any],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    pool: WorkerPool | None = None,
) -> list[bool | None]:
    """Grade extracted answers against gold answers: True, False, or None when the gold is unusable.

    Args:
        predictions: per sample, an extracted answer, a list of them (all must be right: a hedged
            completion gets no credit), or None / an empty list for "no answer" (graded False).
        golds: per sample, the gold answer; a worked solution is reduced to its ``#### N`` or
            ``\\boxed{}`` answer first (:func:`rewards.extract.gold_answer_text`).
        timeout: seconds allowed for each math-verify step (parsing an answer, comparing two),
            rounded up to whole seconds; a sample whose grading overruns grades False (its worker
            process is killed and replaced if math-verify's own timeout does not stop it).
        pool: worker processes to use (default: the shared pool).

    Returns:
        One result per sample. None means the gold answer is missing or math-verify cannot parse it;
        a warning is logged the first time each such gold is seen.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"grade_many got {len(predictions)} predictions for {len(golds)} gold answers")
    results: list[bool | None] = [None] * len(golds)
    jobs: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for i, (pred, gold) in enumerate(zip(predictions, golds)):
        gold_text = gold_answer_text(gold)
        if gold_text is None:
            _warn_gold(repr(gold), f"gold answer {gold!r} is empty or not text; its samples score None")
            continue
        candidates = (pred,) if isinstance(pred, str) else tuple(pred or ())
        fast = _grade_fast(candidates, gold_text)
        if fast is not None:
            results[i] = fast
        else:
            jobs.setdefault((candidates, gold_text), []).append(i)
    if jobs:
        timeout_s = max(1, math.ceil(timeout))
        keys = list(jobs)
        steps = 1 + 2 * max((len(c) for c, _ in keys), default=1)  # parse gold, then parse + compare each
        outcomes = _pool(pool).map(
            _verify_in_worker, [(list(c), g, timeout_s) for c, g in keys], timeout=steps * timeout_s + 1
        )
        for (candidates, gold_text), outcome in zip(keys, outcomes):
            value = outcome.value if outcome.ok else False
            if value is None:
                _warn_gold(
                    gold_text,
                    f"math-verify cannot parse the gold answer {gold_text!r}; its samples score None",
                )
            for i in jobs[(candidates, gold_text)]:
                results[i] = value
    return results


def grade(
    prediction: str | Sequence[str] | None, gold: Any, *, timeout: float = DEFAULT_TIMEOUT_S
) -> bool | None:
    """Grade one extracted answer against one gold answer (see :func:`grade_many`)."""
    return grade_many([prediction], [gold], timeout=timeout)[0]


def answers_equivalent(a: str, b: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Return True if answer ``b`` is mathematically equal to answer ``a`` (``a`` is read as the reference).

    For grouping sampled answers by equivalence (maj@k); an unparsable ``a`` counts as not equal.
    """
    return grade(b, a, timeout=timeout) is True


def grade_completion(
    completion: Any, gold: Any, *, extract: str = "auto", timeout: float = DEFAULT_TIMEOUT_S
) -> bool | None:
    """Extract a completion's answer(s) (:func:`rewards.extract.extract_answers`) and grade them."""
    return grade_many(
        [extract_answers(completion_text(completion), check_mode(extract))], [gold], timeout=timeout
    )[0]


def unparsable_gold_count(gold: str) -> int:
    """Return how many times the gold answer ``gold`` was found unparsable in this process."""
    return _warn_gold.count(gold)


@register("accuracy", aliases=("math_accuracy",))
def make_accuracy_reward(
    extract: str = "auto",
    gold_column: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> RewardFn:
    """Build the math accuracy reward: 1.0 if the final answer equals the gold answer, else 0.0.

    Args:
        extract: where the answer is read (:data:`rewards.extract.EXTRACT_MODES`). With several
            distinct answers (e.g. two ``\\boxed{}``), all must be right.
        gold_column: dataset column holding the gold answer; default: the first of
            :data:`GOLD_COLUMNS` present. A worked solution (``#### N`` or ``\\boxed{}``) is reduced
            to its final answer.
        timeout: seconds allowed for each math-verify step (see :func:`grade_many`); an overrun
            scores 0.0.

    Scores None (not 0) for samples whose gold answer math-verify cannot parse, with a warning once.
    """
    check_mode(extract)
    columns_tried = (gold_column,) if gold_column else GOLD_COLUMNS

    def accuracy(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        golds = column(columns, columns_tried, len(completions), "accuracy")
        answers = [extract_answers(completion_text(c), extract) for c in completions]
        return [None if r is None else float(r) for r in grade_many(answers, golds, timeout=timeout)]

    return named(accuracy, "accuracy", make_accuracy_reward.__doc__)
