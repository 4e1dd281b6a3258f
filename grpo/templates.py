"""Prompt templates: how a data row's question becomes the text the policy continues.

A template is a name from :data:`TEMPLATES` (``r1_zero``, ``chat``, ``plain``, ``tiny``) or a format
string over the row's columns (``"Q: {prompt}\\nA:"``). Conversational rows, whose ``prompt`` is a list
of chat messages, always go through the tokenizer's chat template.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)
"""DeepSeek-R1-Zero's training template, word for word (DeepSeek-R1 paper, Table 1)."""

TINY = "Q: {prompt}\nA:"
"""For the character-level tiny model: 6 characters around the question, so prompts stay short, and a
marker (``A:``) after which the completion starts with ``<think>`` (the ``format`` reward's default,
``think_in_prompt=False``, and the SFT reference completion both expect the tag in the completion)."""

CHAT = "chat"
"""The tokenizer's chat template, one user message, ``add_generation_prompt=True``."""

TEMPLATES: dict[str, str] = {"r1_zero": R1_ZERO, "chat": CHAT, "plain": "{prompt}", "tiny": TINY}
"""Named templates; every other template must be a format string with at least one ``{column}``."""


def template_columns(template: str) -> list[str]:
    """Return the columns a template reads (``["prompt"]`` for the named ones), checking it is valid.

    Raises:
        ValueError: an unknown name, a malformed format string, or a field that is not a plain column
            name (positional ``{}``, attribute or index access).
    """
    if template in TEMPLATES:
        return ["prompt"]
    if "{" not in template:
        raise ValueError(
            f"unknown prompt template {template!r}; allowed: {', '.join(TEMPLATES)}, "
            "or a format string such as 'Q: {prompt}\\nA:' (other columns as {name})"
        )
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"prompt template {template!r} is not a valid format string: {exc} (write {{{{ for a literal brace)") from exc
    bad = [f for f in fields if not f.isidentifier()]
    if bad or not fields:
        raise ValueError(
            f"prompt template {template!r}: fields must be column names such as {{prompt}}; "
            f"got {', '.join(repr('{' + f + '}') for f in bad) or 'no field'}"
        )
    return list(dict.fromkeys(fields))


def is_conversational(prompt: Any) -> bool:
    """Return True if ``prompt`` is a list of chat messages (``{"role": ..., "content": ...}`` dicts)."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt)
    )


def _apply_chat_template(messages: list[Any], tokenizer: Any) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the chat template is needed (template 'chat' or a conversational prompt) but "
            + ("no tokenizer was given" if tokenizer is None else "the tokenizer has no chat_template")
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(row: Mapping[str, Any], template: str = "r1_zero", tokenizer: Any = None) -> str:
    """Return the prompt text for one row.

    Args:
        row: a data row; ``prompt`` is the question (a string) or a list of chat messages.
        template: a name from :data:`TEMPLATES` or a format string over the row's columns.
        tokenizer: a Hugging Face tokenizer with a chat template; needed for ``chat`` and
            conversational rows only.

    Raises:
        KeyError: the row lacks a column the template reads (the message names it and lists the
            row's columns).
        ValueError: an invalid template, or a chat template needed but not available.
    """
    columns = template_columns(template)
    missing = [c for c in columns if c not in row]
    if missing:
        raise KeyError(
            f"prompt template {template!r} needs column(s) {', '.join(map(repr, missing))}; "
            f"the row's columns are: {', '.join(map(str, row)) or '(none)'}"
        )
    prompt = row.get("prompt")
    if is_conversational(prompt):
        return _apply_chat_template([dict(m) for m in prompt], tokenizer)
    if template == CHAT:
        return _apply_chat_template([{"role": "user", "content": str(prompt)}], tokenizer)
    return TEMPLATES.get(template, template).format_map({c: row[c] for c in columns})


def encode_prompt(tokenizer: Any, text: str, template: str) -> list[int]:
    """Return a rendered prompt's token ids as training feeds them to the engine: the text tokenized
    without special tokens, with BOS prepended (if the tokenizer has one and the text does not start
    with it) unless the template is ``chat`` (the chat template writes its own)."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos) and template != CHAT:
        ids = [bos, *ids]
    return ids
