"""Grading sampled completions: the reward function that decides correctness (the same ones that train the
policy), how answers are read from a completion and grouped for maj@k, and the per-sample grade records."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rewards as rewards_lib
from rewards.extract import EXTRACT_MODES, extract_answers

from .estimators import math_equivalent_many, same_string

MATH_GRADERS = ("accuracy", "math_accuracy", "gsm8k", "numeric")
"""Graders whose answers are grouped by mathematical equivalence for maj@k; other graders group by string."""
_FULL_MARKS = 1.0 - 1e-9


@dataclass(frozen=True)
class Grader:
    """The reward function that decides correctness, and how its answers are read and grouped."""

    name: str
    reward: Callable[..., Any]
    extract: str = "auto"
    """Where the recorded answer is read (:data:`rewards.extract.EXTRACT_MODES`), the reward's own mode."""
    math_equivalence: bool = True
    """maj@k groups answers by :func:`rewards.math.answers_equivalent` (else by string)."""

    def equivalent_many(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Return, per ``(representative, answer)`` pair, whether the two fall in one maj@k group."""
        return math_equivalent_many(pairs) if self.math_equivalence else [same_string(a, b) for a, b in pairs]


def auto_grader_name(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return the reward that grades these rows: ``countdown`` when every row has ``target`` and
    ``numbers`` (or ``nums``), else ``accuracy`` (math answers, math-verify)."""
    if rows and all("target" in r and ("numbers" in r or "nums" in r) for r in rows):
        return "countdown"
    return "accuracy"


def resolve_grader(grader: str | Grader, rows: Sequence[Mapping[str, Any]]) -> Grader:
    """Return the :class:`Grader` for ``grader``: ``"auto"`` (:func:`auto_grader_name`), a registered
    reward name (``accuracy``, ``countdown``, ``gsm8k``...) or ``package.module:function``.

    Raises:
        ValueError: an unknown reward (the message lists the registered ones).
    """
    if isinstance(grader, Grader):
        return grader
    name = auto_grader_name(rows) if grader == "auto" else grader
    reward = rewards_lib.resolve(name)
    extract = "auto"
    if name in rewards_lib.names():
        extract = str(rewards_lib.options(name).get("extract", "auto"))
    return Grader(name, reward, extract if extract in EXTRACT_MODES else "auto", name in MATH_GRADERS)


def _single_answer(text: str, mode: str) -> str | None:
    answers = extract_answers(text, mode)
    return answers[0] if len(answers) == 1 else None


def grade_samples(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    grader: str | Grader = "auto",
    *,
    prompts: Sequence[str] | None = None,
    think_in_prompt: bool = False,
) -> list[dict[str, Any]]:
    """Grade completions exactly as training rewards them: the grader's reward function (the ``accuracy``
    reward for math) decides ``correct`` (full marks), the R1 ``format`` reward decides ``format_ok``.

    Args:
        rows: the data row of each completion (one per completion; repeat a row for its n samples).
        completions: the completion texts.
        grader: see :func:`resolve_grader`.
        prompts: the prompt texts passed to the rewards (default: the rows' ``prompt``).
        think_in_prompt: the prompt ends with ``<think>`` (the format reward then expects no opening tag).

    Returns:
        Per completion: ``answer`` (the final answer, read as the grader reads it; None when there is none
        or several different ones, a hedge the graders score wrong), ``correct``, ``score`` (raw; None
        when the reward does not apply) and ``format_ok``.

    Raises:
        ValueError: ``rows`` and ``completions`` differ in length, or an unknown grader.
        rewards.RewardError: the reward function failed.
    """
    if len(rows) != len(completions):
        raise ValueError(f"grade_samples got {len(rows)} rows for {len(completions)} completions")
    if not rows:
        return []
    g = resolve_grader(grader, rows)
    texts = list(completions)
    prompt_list = list(prompts) if prompts is not None else [r.get("prompt") for r in rows]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"]
    columns = {k: [r.get(k) for r in rows] for k in keys}
    scores = rewards_lib.call_reward(g.reward, prompt_list, texts, None, columns, name=g.name)
    fmt = rewards_lib.get("format", think_in_prompt=True) if think_in_prompt else rewards_lib.get("format")
    formats = rewards_lib.call_reward(fmt, prompt_list, texts, None, columns, name="format")
    return [
        {
            "answer": _single_answer(text, g.extract),
            "correct": score is not None and score >= _FULL_MARKS,
            "score": score,
            "format_ok": f is not None and f >= _FULL_MARKS,
        }
        for text, score, f in zip(texts, scores, formats)
    ]
