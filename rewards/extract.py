"""Find the final answer in a completion: inside ``<answer>...</answer>``, in ``\\boxed{}``, or after ``####``.

Every function here is a linear scan or an anchored regex, so no input makes it slow; the rules are
strict on purpose (one answer block, nothing after it), because a lenient extractor is what a policy
learns to game.
"""

from __future__ import annotations

import re
from typing import Any

EXTRACT_MODES = ("auto", "answer_tag", "boxed", "gsm8k")
"""Where the answer is looked for.

- ``answer_tag``: the completion holds exactly one ``<answer>...</answer>`` block with nothing but
  whitespace after it; the answer is the block's ``\\boxed{}`` contents if it has any, else the block.
- ``boxed``: the ``\\boxed{}`` (or ``\\fbox{}``) answers after the last ``</think>``.
- ``gsm8k``: the last ``#### N`` line after the last ``</think>``.
- ``auto``: ``answer_tag`` rules if the completion contains an answer tag at all, else ``boxed``,
  else ``gsm8k``.
"""

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_GSM8K_LINE = re.compile(r"^[ \t]*####[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_WHITESPACE = re.compile(r"\s+")
_BARE_BOX_TOKEN = re.compile(r"[^\s$]+")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`EXTRACT_MODES`, else raise a ValueError listing them."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown answer extraction mode {mode!r}; allowed: {', '.join(EXTRACT_MODES)}")
    return mode


def answer_section(text: str) -> str:
    """Return the part of ``text`` after the last ``</think>`` (all of it when there is none)."""
    cut = text.rfind(THINK_CLOSE)
    return text if cut < 0 else text[cut + len(THINK_CLOSE) :]


def answer_tag_content(text: str) -> str | None:
    """Return the stripped content of the single ``<answer>...</answer>`` block, or None.

    None when there is no block, more than one opening or closing tag (repeated or nested blocks),
    the closing tag comes first, the block is empty, or anything but whitespace follows ``</answer>``.
    """
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start = text.find(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE)
    if end < start or text[end + len(ANSWER_CLOSE) :].strip():
        return None
    content = text[start:end].strip()
    return content or None


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of each ``{`` that is closed to the index of its ``}``, in one pass.

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX and do not count.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def find_boxed(text: str) -> list[str]:
    """Return the contents of every top-level ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order.

    A box inside another box is part of the outer one's contents (``\\boxed{\\boxed{5}}`` gives
    ``5`` after unwrapping). ``\\boxed 5`` (no braces) gives the token after the command. Boxes whose
    braces never close are ignored.
    """
    pairs: dict[int, int] | None = None
    found: list[str] = []
    i, n = 0, len(text)
    while i < n:
        j = text.find("\\", i)
        if j < 0:
            break
        command = next((c for c in _BOX_COMMANDS if text.startswith(c, j)), None)
        if command is None:
            i = j + 2
            continue
        after = j + len(command)
        if after < n and text[after].isalpha():
            i = after
            continue
        k = after
        while k < n and text[k] in " \t":
            k += 1
        if k < n and text[k] == "{":
            if pairs is None:
                pairs = _matching_braces(text)
            close = pairs.get(k)
            if close is None:
                i = k + 1
                continue
            found.append(_unwrap_box(text, k, close, pairs))
            i = close + 1
        elif k > after and (token := _BARE_BOX_TOKEN.match(text, k)):
            found.append(token.group(0))
            i = token.end()
        else:
            i = max(after, k)
    return [b for b in found if b]


def _unwrap_box(text: str, open_at: int, close_at: int, pairs: dict[int, int]) -> str:
    """Return the contents of the box whose braces are at ``open_at``/``close_at``.

    A box that holds exactly another box (``\\boxed{\\boxed{x}}``) gives the inner contents ``x``.
    """
    start, end = open_at + 1, close_at
    while True:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        command = next((c for c in _BOX_COMMANDS if text.startswith(c, start)), None)
        if command is None:
            break
        k = start + len(command)
        while k < end and text[k] in " \t":
            k += 1
        if k >= end or text[k] != "{" or pairs.get(k) != end - 1:
            break
        start, end = k + 1, end - 1
    return text[start:end]


def gsm8k_answer(text: str) -> str | None:
    """Return what follows the last ``#### `` line (GSM8K's final-answer marker), or None."""
    last = None
    for match in _GSM8K_LINE.finditer(text):
        last = match.group(1)
    if last is None:
        return None
    last = last.strip()
    return last or None


def _distinct(answers: list[str]) -> list[str]:
    """Drop answers that repeat an earlier one up to whitespace, keeping order."""
    seen: set[str] = set()
    out = []
    for a in answers:
        key = _WHITESPACE.sub("", a)
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def extract_answers(text: str, mode: str = "auto") -> list[str]:
    """Return the distinct final answers a completion gives (see :data:`EXTRACT_MODES`).

    Usually one; several means the completion hedges (``\\boxed{3}`` ... ``\\boxed{4}``), and a grader
    should give credit only if every one is right. Empty when the completion gives no answer under
    ``mode``'s rules.
    """
    check_mode(mode)
    if mode == "answer_tag" or (mode == "auto" and (ANSWER_OPEN in text or ANSWER_CLOSE in text)):
        content = answer_tag_content(text)
        if content is None:
            return []
        boxes = find_boxed(content)
        return _distinct(boxes) if boxes else [content]
    section = answer_section(text)
    if mode in ("boxed", "auto"):
        boxes = _distinct(find_boxed(section))
        if boxes or mode == "boxed":
            return boxes
    marked = gsm8k_answer(section)
    return [marked] if marked is not None else []


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """Return the completion's final answer, the last of :func:`extract_answers`, or None if it gives none."""
    answers = extract_answers(text, mode)
    return answers[-1] if answers else None


def gold_answer_text(gold: Any) -> str | None:
    """Return the answer to grade against from a dataset's gold field.

    Numbers become strings (``27.0`` -> ``"27.0"``); a worked solution ending in ``#### N`` gives ``N``;
    a solution with ``\\boxed{}`` gives the last box; any other string is the answer itself. None for
    a missing or empty gold.
    """
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        return repr(gold) if isinstance(gold, float) else str(gold)
    if not isinstance(gold, str):
        return None
    if "####" in gold:
        marked = gsm8k_answer(gold)
        if marked is not None:
            return marked
    if "\\boxed" in gold or "\\fbox" in gold:
        boxes = find_boxed(gold)
        if boxes:
            return boxes[-1]
    gold = gold.strip()
    return gold or None
