"""The contract every reward function follows, and helpers to read its inputs.

A reward function is called as TRL calls one: ``f(prompts, completions, completion_ids=None, **columns)``
and returns one ``float`` or ``None`` ("not applicable") per completion.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

Score = float | None
"""One sample's reward: a number, or None when the reward does not apply to that sample."""

RewardFn = Callable[..., list[Score] | Awaitable[list[Score]]]
"""``f(prompts, completions, completion_ids=None, **columns) -> list[float | None]`` (may be ``async``)."""

logger = logging.getLogger("rewards")


def message_text(message: Any) -> str:
    """Return the text of one chat message or message content.

    Accepts a plain string, a ``{"role": ..., "content": ...}`` dict whose content is a string or a
    list of parts (``{"type": "text", "text": ...}``), or such a list of parts on its own.
    """
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    if isinstance(message, Mapping):
        if "content" in message:
            return message_text(message["content"])
        if message.get("type") == "text":
            return str(message.get("text", ""))
        return ""
    if isinstance(message, Sequence):
        return "".join(message_text(part) for part in message)
    raise TypeError(
        f"cannot read text from a {type(message).__name__}; allowed: a string, a message dict "
        "with 'content', or a list of content parts"
    )


def completion_text(completion: Any) -> str:
    """Return the generated text of one completion.

    A completion is either a string (standard data) or, for conversational data, a list of messages
    such as ``[{"role": "assistant", "content": "..."}]``; then the assistant messages' contents are
    joined with newlines (all messages when none has a role).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and all(isinstance(m, Mapping) for m in completion):
        messages = [m for m in completion if m.get("role", "assistant") == "assistant"]
        return "\n".join(message_text(m) for m in messages)
    return message_text(completion)


def prompt_key(prompt: Any) -> str:
    """Return a string that identifies a prompt, so completions of the same prompt can be grouped."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return "\x1e".join(
            f"{m.get('role', '')}\x1f{message_text(m)}" if isinstance(m, Mapping) else message_text(m)
            for m in prompt
        )
    return repr(prompt)


def column(columns: Mapping[str, Any], names: Sequence[str], n: int, reward: str) -> list[Any]:
    """Return the first of ``names`` present in ``columns``, checked to hold one value per completion.

    Raises:
        KeyError: none of ``names`` is a column; the message lists the columns that exist.
        ValueError: the column does not hold ``n`` values.
    """
    for name in names:
        if name in columns and columns[name] is not None:
            values = columns[name]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(
                    f"reward {reward!r}: column {name!r} must be a list with one value per completion, "
                    f"got a {type(values).__name__}"
                )
            if len(values) != n:
                raise ValueError(
                    f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions"
                )
            return list(values)
    present = sorted(k for k in columns if k != "trainer_state")
    raise KeyError(
        f"reward {reward!r} needs a dataset column named {' or '.join(repr(x) for x in names)}; "
        f"the columns passed are: {', '.join(present) or '(none)'}"
    )


def token_lengths(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
    """Return each completion's length: its token count when ``completion_ids`` is given, else characters."""
    if completion_ids is not None:
        if len(completion_ids) != len(completions):
            raise ValueError(
                f"completion_ids has {len(completion_ids)} entries for {len(completions)} completions"
            )
        return [len(ids) for ids in completion_ids]
    return [len(completion_text(c)) for c in completions]


class WarnOnce:
    """Log a warning the first time a key is seen, and count every occurrence after that."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, message: str) -> None:
        """Log ``message`` if ``key`` was not seen before; count it either way."""
        with self._lock:
            first = key not in self._seen
            self._seen[key] = self._seen.get(key, 0) + 1
        if first:
            logger.warning(message)

    def count(self, key: str) -> int:
        """Return how many times ``key`` was reported."""
        with self._lock:
            return self._seen.get(key, 0)


def named(fn: Callable[..., Any], name: str, doc: str | None = None, full_marks: float | None = None
          ) -> Callable[..., Any]:
    """Give a reward closure a readable name (TRL logs rewards under ``__name__``). ``full_marks``: the best
    score it gives when not 1 (0 for a penalty), which :func:`rewards.check.check_rewards` expects of gold
    answers."""
    fn.__name__ = name
    fn.__qualname__ = name
    if doc is not None:
        fn.__doc__ = doc
    if full_marks is not None:
        fn.full_marks = full_marks  # type: ignore[attr-defined]
    return fn
