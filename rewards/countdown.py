"""Countdown: the answer is an arithmetic expression that uses each given number exactly once and hits the target.

Expressions are read by a small recursive-descent parser over ``+ - * / ( )`` and integer literals,
evaluated with exact fractions. Nothing is ever passed to ``eval``; powers, unary signs, decimals,
long literals, deep nesting and long inputs are refused before any arithmetic happens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rewards.base import RewardFn, Score, column, completion_text, named
from rewards.extract import check_mode, extract_answers
from rewards.registry import register

ALLOWED = "integers from the given numbers, + - * / and parentheses"


class ExpressionError(ValueError):
    """The expression is malformed or uses something not allowed; the message says what and where."""


@dataclass(frozen=True)
class ExpressionLimits:
    """Bounds that keep parsing cheap whatever the input."""

    max_chars: int = 200
    """Longest expression accepted (characters)."""
    max_digits: int = 6
    """Longest integer literal accepted (digits)."""
    max_depth: int = 16
    """Deepest parenthesis nesting accepted."""


_TOKEN = re.compile(r"\s*(?:(\d+)|(\*\*|[-+*/()^%.,=]|\S))")
_SYMBOLS = {"×": "*", "·": "*", "÷": "/", "−": "-", "\\times": "*", "\\cdot": "*", "\\div": "/"}


def _normalize(text: str) -> str:
    text = text.strip().strip("$").strip()
    if (text.startswith("\\(") and text.endswith("\\)")) or (text.startswith("\\[") and text.endswith("\\]")):
        text = text[2:-2]
    for symbol, ascii_op in _SYMBOLS.items():
        text = text.replace(symbol, ascii_op)
    return text.replace("\\left", "").replace("\\right", "")


class _Parser:
    """expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ; factor := INT | '(' expr ')'."""

    def __init__(self, text: str, limits: ExpressionLimits) -> None:
        self.limits = limits
        self.tokens: list[tuple[str, int]] = []  # (token, position); integers keep their digits
        for match in _TOKEN.finditer(text):
            token = match.group(1) or match.group(2)
            pos = match.start(1) if match.group(1) else match.start(2)
            if match.group(1) and len(token) > limits.max_digits:
                raise ExpressionError(
                    f"number at position {pos} has {len(token)} digits; at most {limits.max_digits} allowed"
                )
            if match.group(2) is not None and token not in "+-*/()":
                what = "'**' (power)" if token in ("**", "^") else repr(token)
                raise ExpressionError(f"{what} at position {pos} is not allowed; allowed: {ALLOWED}")
            self.tokens.append((token, pos))
        self.i = 0
        self.literals: list[int] = []

    def _peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def _where(self) -> str:
        return f"position {self.tokens[self.i][1]}" if self.i < len(self.tokens) else "the end"

    def parse(self) -> Fraction:
        if not self.tokens:
            raise ExpressionError("the expression is empty")
        value = self._expr(0)
        if self.i != len(self.tokens):
            raise ExpressionError(f"unexpected {self._peek()!r} at {self._where()}")
        return value

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.i][0]
            self.i += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.i][0]
            self.i += 1
            rhs = self._factor(depth)
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ExpressionError(f"division by zero before {self._where()}")
            else:
                value = value / rhs
        return value

    def _factor(self, depth: int) -> Fraction:
        token = self._peek()
        if token is None:
            raise ExpressionError("the expression ends where a number or '(' is expected")
        if token.isdigit():
            self.i += 1
            self.literals.append(int(token))
            return Fraction(int(token))
        if token == "(":
            if depth >= self.limits.max_depth:
                raise ExpressionError(f"parentheses nested deeper than {self.limits.max_depth}")
            self.i += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ExpressionError(f"missing ')' at {self._where()}")
            self.i += 1
            return value
        if token in ("+", "-"):
            raise ExpressionError(f"unary {token!r} at {self._where()} is not allowed; allowed: {ALLOWED}")
        raise ExpressionError(f"unexpected {token!r} at {self._where()}")


def evaluate(expression: str, limits: ExpressionLimits = ExpressionLimits()) -> tuple[Fraction, list[int]]:
    """Return the exact value of an arithmetic expression and the integer literals it uses, in order.

    Accepts ``×``/``÷``/``\\times``/``\\div`` for ``*``/``/``, surrounding ``$`` and one trailing
    ``= N``.

    Raises:
        ExpressionError: the expression is malformed, too long, too deep, or uses something other
            than :data:`ALLOWED` (powers, unary signs, decimals, names, calls...).
    """
    if len(expression) > limits.max_chars:
        raise ExpressionError(
            f"expression has {len(expression)} characters; at most {limits.max_chars} allowed"
        )
    text = expression
    if text.count("=") > 1:
        raise ExpressionError("more than one '=' in the expression")
    if "=" in text:
        text, _, result = text.partition("=")
        result = result.strip().strip("$").strip()
        if not result.isdigit():
            raise ExpressionError(f"after '=' only the result may follow, got {result!r}")
    text = _normalize(text)
    parser = _Parser(text, limits)
    return parser.parse(), parser.literals


def check_equation(
    expression: str,
    numbers: Sequence[int],
    target: float | Fraction,
    limits: ExpressionLimits = ExpressionLimits(),
) -> bool:
    """Return True if ``expression`` uses every number of ``numbers`` exactly once and equals ``target``.

    Returns False (never raises) for any expression :func:`evaluate` refuses.
    """
    try:
        value, literals = evaluate(expression, limits)
    except ExpressionError:
        return False
    return Counter(literals) == Counter(int(n) for n in numbers) and value == Fraction(target)


@register("countdown")
def make_countdown_reward(
    extract: str = "answer_tag",
    numbers_column: str | None = None,
    target_column: str = "target",
    max_chars: int = 200,
) -> RewardFn:
    """Build the countdown reward: 1.0 if the answer equation passes :func:`check_equation`, else 0.0.

    Args:
        extract: where the equation is read (:data:`rewards.extract.EXTRACT_MODES`).
        numbers_column: column with the list of given numbers; default ``nums`` or ``numbers``.
        target_column: column with the target number.
        max_chars: longest equation accepted.
    """
    check_mode(extract)
    limits = ExpressionLimits(max_chars=max_chars)
    number_columns = (numbers_column,) if numbers_column else ("nums", "numbers")

    def countdown(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        n = len(completions)
        numbers, targets = (
            column(columns, number_columns, n, "countdown"),
            column(columns, (target_column,), n, "countdown"),
        )
        scores: list[Score] = []
        for completion, nums, target in zip(completions, numbers, targets):
            answers = extract_answers(completion_text(completion), extract)
            ok = len(answers) == 1 and check_equation(answers[0], nums, target, limits)
            scores.append(float(ok))
        return scores

    return named(countdown, "countdown", make_countdown_reward.__doc__)
