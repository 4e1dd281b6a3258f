"""Check a recipe's rewards before training: gold answers should score full marks, wrong answers zero.

:func:`check_rewards` scores dataset rows twice: with each row's gold answer written as the ideal
completion, and with another row's ideal completion (a shuffled wrong answer). A reward that gives
full marks to few gold answers, or as many to wrong answers as to right ones, is probably broken
(wrong column, wrong answer format, a parser that never matches). ``grpo check-rewards`` prints this.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.base import Score
from rewards.extract import gold_answer_text
from rewards.runner import RewardSet

R1_TEMPLATE = "<think>\nThe answer follows.\n</think>\n<answer>\n{answer}\n</answer>"
"""The ideal completion of the R1 format, with the gold answer in the answer block."""


def ideal_completion(
    row: Mapping[str, Any],
    answer_column: str = "answer",
    template: str = R1_TEMPLATE,
    conversational: bool = False,
) -> str | list[dict[str, str]]:
    """Write a row's gold answer as the ideal completion (``template`` with ``{answer}`` filled in).

    The gold is reduced to its final answer first (``#### N`` or the last ``\\boxed{}``). With
    ``conversational``, the completion is a one-message list as TRL passes for chat data.
    """
    if answer_column not in row:
        raise KeyError(f"row has no column {answer_column!r}; its columns are: {', '.join(map(str, row))}")
    text = template.format(answer=gold_answer_text(row[answer_column]) or "")
    return [{"role": "assistant", "content": text}] if conversational else text


@dataclass
class FunctionCheck:
    """How one reward function scored the ideal and the wrong completions."""

    name: str
    n: int
    ideal_full: int = 0
    ideal_zero: int = 0
    ideal_none: int = 0
    wrong_full: int = 0
    wrong_zero: int = 0
    wrong_none: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def answer_sensitive(self) -> bool:
        """True if gold answers get full marks more often than wrong answers do."""
        return self.ideal_full > self.wrong_full


@dataclass
class CheckReport:
    """The result of :func:`check_rewards`: one :class:`FunctionCheck` per reward function."""

    n: int
    functions: list[FunctionCheck]
    identical_wrong: int = 0
    """Wrong pairs whose borrowed completion is identical to the row's own ideal one (same answer)."""
    min_full_share: float = 0.9

    def problems(self) -> list[str]:
        """Return one line per likely broken reward (few full marks for gold answers, errors, all None)."""
        lines = []
        for f in self.functions:
            if f.errors:
                lines.append(f"{f.name}: {len(f.errors)} error(s), first: {f.errors[0]}")
            if f.ideal_none == f.n:
                lines.append(f"{f.name}: scored None (not applicable) on every gold answer")
            elif f.ideal_full < self.min_full_share * (f.n - f.ideal_none):
                lines.append(f"{f.name}: only {f.ideal_full}/{f.n} gold answers get full marks")
        return lines

    def format(self) -> str:
        """Return a plain-text table of the counts, followed by the problems found."""
        header = (
            f"{'reward':<24}{'gold: full':>11}{'zero':>6}{'None':>6}{'wrong: full':>13}{'zero':>6}{'None':>6}"
        )
        rows = [header]
        for f in self.functions:
            rows.append(
                f"{f.name:<24}{f.ideal_full:>11}{f.ideal_zero:>6}{f.ideal_none:>6}"
                f"{f.wrong_full:>13}{f.wrong_zero:>6}{f.wrong_none:>6}"
            )
        rows.append(f"({self.n} rows; {self.identical_wrong} wrong pairs share the gold answer)")
        for f in self.functions:
            if f.n and f.wrong_full == f.ideal_full and not f.errors:
                rows.append(f"note: {f.name} gives wrong answers the same marks as gold ones "
                            "(right for a format reward, a bug in an answer checker)")
        problems = self.problems()
        rows += ["problems:", *(f"  {p}" for p in problems)] if problems else ["no problems found"]
        return "\n".join(rows)


def _derangement(n: int, rng: random.Random) -> list[int]:
    """Return a permutation of range(n) with no fixed point (n >= 2): row i borrows row perm[i]."""
    shift = rng.randrange(1, n)
    order = list(range(n))
    rng.shuffle(order)
    perm = [0] * n
    for k, i in enumerate(order):
        perm[i] = order[(k + shift) % n]
    return perm


def _tally(check: FunctionCheck, scores: Sequence[Score], full_marks: float, prefix: str) -> None:
    for s in scores:
        if s is None:
            setattr(check, f"{prefix}_none", getattr(check, f"{prefix}_none") + 1)
        elif s >= full_marks - 1e-9:
            setattr(check, f"{prefix}_full", getattr(check, f"{prefix}_full") + 1)
        elif abs(s) <= 1e-9:
            setattr(check, f"{prefix}_zero", getattr(check, f"{prefix}_zero") + 1)


def check_rewards(
    rewards: RewardSet | Iterable[Any],
    rows: Sequence[Mapping[str, Any]],
    make_completion: Callable[[Mapping[str, Any]], Any] = ideal_completion,
    n: int = 100,
    *,
    prompt_column: str = "prompt",
    full_marks: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    completion_columns: Callable[[list[Any]], Mapping[str, list[Any]]] | None = None,
) -> CheckReport:
    """Score the first ``n`` rows' ideal completions and shuffled wrong ones with ``rewards``.

    Args:
        rewards: the recipe's rewards, as a :class:`RewardSet` or the entries one takes; errors are
            counted, not raised (``on_error`` is ignored).
        rows: dataset rows, each a mapping of column name to value, as the trainer sees them.
        make_completion: writes a row's ideal completion (default :func:`ideal_completion`).
        n: how many rows to use (all if fewer); at least 2 are needed for wrong answers.
        prompt_column: column passed as the prompt (empty prompts when absent).
        full_marks: the score counted as full marks, for rewards that do not declare their own (a penalty's
            is 0: ``named(..., full_marks=0.0)``).
        seed: seed of the shuffle that pairs each row with another row's completion.
        batch_size: rows scored per call.
        completion_columns: columns that describe each completion rather than its row, made from the
            completions (e.g. the ``tool_calls`` a tool-using trainer passes, parsed from the text).
    """
    rows = [rows[i] for i in range(min(n, len(rows)))]
    if len(rows) < 2:
        raise ValueError(
            f"check_rewards needs at least 2 rows (one's answer is another's wrong answer), got {len(rows)}"
        )
    if not isinstance(rewards, RewardSet):
        rewards = RewardSet(rewards)
    checker = RewardSet(rewards.rewards, on_error="none", timeout=rewards.timeout, parallel=rewards.parallel)
    ideal = [make_completion(row) for row in rows]
    perm = _derangement(len(rows), random.Random(seed))
    wrong = [ideal[j] for j in perm]
    checks = {name: FunctionCheck(name, len(rows)) for name in checker.names}
    marks = {name: getattr(r.fn, "full_marks", full_marks) for name, r in zip(checker.names, checker.rewards)}
    for prefix, completions in (("ideal", ideal), ("wrong", wrong)):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            columns = {key: [row.get(key) for row in batch] for key in batch[0]}
            prompts = columns.pop(prompt_column, None) or [""] * len(batch)
            scored = completions[start : start + len(batch)]
            if completion_columns is not None:
                columns.update(completion_columns(scored))
            scores = checker(prompts, scored, None, **columns)
            for name, values in scores.per_function.items():
                _tally(checks[name], values, marks[name], prefix)
            for failure in scores.failures:
                index = "batch" if failure.index is None else f"row {start + failure.index}"
                checks[failure.name].errors.append(f"{prefix} completion, {index}: {failure.message}")
    identical = sum(ideal[i] == wrong[i] for i in range(len(rows)))
    return CheckReport(len(rows), list(checks.values()), identical)
