"""The estimators of a benchmark score from n samples per problem: pass@k (unbiased), mean@n (R1's sampled
pass@1), maj@k (majority vote over answers grouped by equivalence) and the paired standard error of a change."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from rewards.math import answers_equivalent, grade_many

_WHITESPACE = re.compile(r"\s+")




def _check_counts(n: int, c: int) -> None:
    for name, value in (("n", n), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} is not allowed; use an integer")
    if n < 1:
        raise ValueError(f"n={n} is not allowed; the number of samples must be >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is not allowed with n={n}; the number correct must be in [0, {n}]")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k), the probability that a random k-subset of the n samples holds at
    least one correct one, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no large binomials).

    Raises:
        ValueError: ``n < 1``, ``c`` outside ``[0, n]``, or ``k`` outside ``[1, n]``.
    """
    _check_counts(n, c)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} is not allowed with n={n}; pass@k needs an integer k in [1, {n}]")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_at_n(n: int, c: int) -> float:
    """Return the fraction of ``n`` samples that are correct, ``c / n``: R1's pass@1 "with k sampled
    responses" (mean@n), equal to :func:`pass_at_k` with ``k=1``."""
    _check_counts(n, c)
    return c / n


def paired_standard_error(after: Sequence[float], before: Sequence[float]) -> float:
    """Return the standard error of mean(after) - mean(before) over the same problems: the sample standard
    deviation of the per-problem differences over sqrt(problems). Pairing removes the spread of problem
    difficulty, which both checkpoints share, so a real gain stands out of far less noise than two
    independent error bars would allow.

    Raises:
        ValueError: the two lists differ in length or hold fewer than 2 problems.
    """
    if len(after) != len(before) or len(after) < 2:
        raise ValueError(f"paired_standard_error needs two equal-length lists of >= 2 problems, got "
                         f"{len(after)} and {len(before)}")
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return math.sqrt(variance / len(diffs))


def same_string(a: str, b: str) -> bool:
    return _WHITESPACE.sub("", a) == _WHITESPACE.sub("", b)


EquivalentMany = Callable[[list[tuple[str, str]]], list[bool]]
"""Batched equivalence: ``[(representative, answer), ...] -> [equal?, ...]`` (one round of grading)."""


def math_equivalent_many(pairs: list[tuple[str, str]]) -> list[bool]:
    """Batched :func:`rewards.math.answers_equivalent`: one :func:`rewards.math.grade_many` call, each
    answer graded against its representative as the gold."""
    if not pairs:
        return []
    return [r is True for r in grade_many([b for _, b in pairs], [a for a, _ in pairs])]


def group_answers_many(
    answer_lists: Sequence[Sequence[str | None]], equivalent_many: EquivalentMany
) -> list[list[int | None]]:
    """Group each problem's answers for majority voting; return a group id per sample (None: no answer).

    Samples are taken in order; an answer joins the first group whose representative (first answer) it
    equals up to whitespace, else the first for which ``equivalent_many`` says equal, else opens a new
    group. The grouping of the first k samples is therefore the prefix of the grouping of all n. All
    problems advance together, one ``equivalent_many`` call per sample position, so a batched grader
    sees many pairs at once.
    """
    reps: list[list[int]] = [[] for _ in answer_lists]  # per problem: sample index of each group's representative
    ids: list[list[int | None]] = [[None] * len(a) for a in answer_lists]
    for t in range(max((len(a) for a in answer_lists), default=0)):
        pending: list[int] = []
        for p, answers in enumerate(answer_lists):
            if t >= len(answers) or answers[t] is None:
                continue
            answer = answers[t]
            hit = next((g for g, r in enumerate(reps[p]) if same_string(answers[r] or "", answer or "")), None)
            if hit is None and reps[p]:
                pending.append(p)
            elif hit is None:
                reps[p].append(t)
                ids[p][t] = 0
            else:
                ids[p][t] = hit
        pairs = [(answer_lists[p][r] or "", answer_lists[p][t] or "") for p in pending for r in reps[p]]
        verdicts = iter(equivalent_many(pairs))
        for p in pending:
            found = [next(verdicts) for _ in reps[p]]
            if any(found):
                ids[p][t] = found.index(True)
            else:
                reps[p].append(t)
                ids[p][t] = len(reps[p]) - 1
    return ids


def majority_vote(groups: Sequence[int | None], correct: Sequence[bool], k: int) -> bool:
    """Return whether the majority of the first ``k`` samples' groups (:func:`group_answers_many`) is correct:
    most votes wins, a tie goes to the group voted for earliest, abstentions (None) do not count, no vote
    at all fails; the winning group is correct when its first sample is."""
    first: dict[int, int] = {}
    votes: dict[int, int] = {}
    for i, g in enumerate(groups[:k]):
        if g is not None:
            first.setdefault(g, i)
            votes[g] = votes.get(g, 0) + 1
    if not votes:
        return False
    winner = max(votes, key=lambda g: (votes[g], -first[g]))
    return bool(correct[first[winner]])


def majority_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    *,
    equivalent: Callable[[str, str], bool] = answers_equivalent,
) -> bool:
    """Return whether majority voting over the first ``k`` samples picks a correct answer (maj@k).

    Rules:
        - The first ``k`` samples vote (not an average over all k-subsets), so maj@k is reproducible and
          maj@n uses every sample.
        - Answers are grouped by ``equivalent(representative, answer)`` (default: mathematical
          equivalence, :func:`rewards.math.answers_equivalent`, so ``1/2``, ``0.5`` and ``\\frac{1}{2}``
          are one group); a group's representative is its first answer. Answers equal up to whitespace
          always share a group.
        - A sample with no answer (None) abstains. If every sample abstains, the vote fails (False).
        - The group with the most votes wins; a tie goes to the group whose first vote came earliest.
        - The winning group is correct when its representative sample is (``correct`` is the grader's
          verdict per sample).

    :func:`evaluate` applies the same rules to all problems at once (:func:`group_answers_many`, then
    :func:`majority_vote`), batching the equivalence checks.

    Raises:
        ValueError: ``answers`` and ``correct`` differ in length, or ``k`` is outside ``[1, len(answers)]``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_at_k got {len(answers)} answers but {len(correct)} correctness flags")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(answers):
        m = len(answers)
        raise ValueError(f"k={k!r} is not allowed with {m} samples; use an integer in [1, {m}]")
    groups = group_answers_many([answers[:k]], lambda pairs: [equivalent(a, b) for a, b in pairs])[0]
    return majority_vote(groups, correct, k)
