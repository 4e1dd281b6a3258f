"""Tools a policy calls mid-episode, and the `Toolbox` that finds, runs and renders their calls for
`grpo.rollout.episodes`: a registry of named tools (`python`: the code runs in the sandbox of rewards/code.py),
TRL-like user functions (`tools=[fn]`: called with the JSON arguments of a `<tool_call>`), and a bounded pool
that runs one step's calls concurrently, each under a timeout; a call that fails, hangs or floods returns
its (truncated) error text to the policy and never stops the run."""

from __future__ import annotations

import inspect
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rewards.base import completion_text
from rewards.code import SandboxLimits, run_program
from rewards.registry import resolve

from .rollout.episodes import ToolCall, ToolResult


@dataclass(frozen=True)
class CallSyntax:
    """How a call is written (between `open` and `close`) and how its output is shown to the policy."""

    open: str
    close: str
    output_open: str
    output_close: str


PYTHON_FENCE = CallSyntax("```python\n", "```", "```output\n", "```\n")
"""A code tool's call: a fenced Python block; its output comes back in an output fence."""
PYTHON_TAGS = CallSyntax("<python>", "</python>", "<output>", "</output>")
"""The same with tags, for tokenizers without a backtick (the built-in character tokenizer)."""
SYNTAXES = {"fence": PYTHON_FENCE, "tags": PYTHON_TAGS}
TOOL_CALL_TAGS = CallSyntax("<tool_call>", "</tool_call>", "<tool_response>\n", "\n</tool_response>\n")
"""A function tool's call: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen, as TRL)."""


class ToolError(Exception):
    """A tool's own failure: its message is what the policy reads."""


@dataclass
class Tool:
    """A callable tool. code: the call's body is passed as one string (a code tool); else the call is JSON
    and `fn` gets its arguments as keywords."""

    name: str
    fn: Callable[..., Any]
    syntax: CallSyntax = TOOL_CALL_TAGS
    code: bool = False
    description: str = ""


# ----- the registry -----------------------------------------------------------------------------------------
TOOLS: dict[str, Callable[..., Tool]] = {}


def register_tool(name: str) -> Callable[[Callable[..., Tool]], Callable[..., Tool]]:
    """Registers a tool factory under `name`: factory(timeout_s, max_output_chars, **options) -> Tool."""

    def register(factory: Callable[..., Tool]) -> Callable[..., Tool]:
        TOOLS[name] = factory
        return factory

    return register


@register_tool("python")
def python_tool(timeout_s: float = 10.0, max_output_chars: int = 1024, syntax: str = "fence") -> Tool:
    """Runs the call's code as a program in the code reward's sandbox (its own processes, limits, no network,
    killed at the timeout); stdout is the output, a non-zero exit returns stdout and the error's last lines.
    syntax: "fence" (```python ... ```) or "tags" (<python>...</python>, output in <output>...</output>)."""
    if syntax not in SYNTAXES:
        raise ValueError(f"python tool: syntax {syntax!r} is not allowed; allowed: {', '.join(SYNTAXES)}")
    limits = SandboxLimits(cpu_seconds=max(1, math.ceil(timeout_s)), wall_seconds=timeout_s,
                           output_bytes=max(4 * max_output_chars, 4096))

    def run(code: str) -> str:
        result = run_program(code, limits=limits)
        if result.timed_out:
            raise ToolError(f"{result.stdout}TimeoutError: the code ran past {timeout_s:g} s and was killed")
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-3:])
            raise ToolError(f"{result.stdout}{tail or f'exit code {result.returncode}'}")
        return result.stdout

    return Tool("python", run, SYNTAXES[syntax], code=True, description="run Python code; its stdout is returned")


def resolve_tool(spec: str | Callable[..., Any] | Tool, timeout_s: float = 10.0,
                 max_output_chars: int = 1024, options: dict[str, Any] | None = None) -> Tool:
    """A registered name ("python", built with `options`), "pkg.module:function", "path/file.py:function", a
    function or a Tool. A function becomes a JSON-called tool named after it (TRL's `tools=[fn]`)."""
    if isinstance(spec, Tool):
        return spec
    if isinstance(spec, str) and ":" not in spec:
        if spec not in TOOLS:
            raise ValueError(f"unknown tool {spec!r}; registered: {', '.join(sorted(TOOLS))}, "
                             "or 'pkg.module:function' / 'path/file.py:function'")
        return TOOLS[spec](timeout_s=timeout_s, max_output_chars=max_output_chars, **(options or {}))
    fn = resolve(spec) if isinstance(spec, str) else spec
    if not callable(fn):
        raise TypeError(f"tool {spec!r} is not callable")
    return Tool(fn.__name__, fn, TOOL_CALL_TAGS, description=(inspect.getdoc(fn) or "").split("\n")[0])


def truncate(text: str, limit: int) -> str:
    """`text`, cut to its first `limit` characters with a note of how many were dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n...[{len(text) - limit} more characters]"


def split_tool_output(text: str, syntaxes: Sequence[CallSyntax]) -> list[tuple[bool, str]]:
    """A written episode (an SFT trace) cut into (is_tool_output, text) pieces, each output with its markers, so
    that the pieces can be tokenized one by one as an episode tokenizes them and the outputs masked."""
    pieces: list[tuple[bool, str]] = []
    at = 0
    while True:
        found = [(start, syntax) for syntax in syntaxes if (start := text.find(syntax.output_open, at)) >= 0]
        if not found:
            break
        start, syntax = min(found, key=lambda f: f[0])
        end = text.find(syntax.output_close, start + len(syntax.output_open))
        end = len(text) if end < 0 else end + len(syntax.output_close)
        if start > at:
            pieces.append((False, text[at:start]))
        pieces.append((True, text[start:end]))
        at = end
    if at < len(text):
        pieces.append((False, text[at:]))
    return pieces


# ----- the toolbox ------------------------------------------------------------------------------------------
class Toolbox:
    """The episode's tools (a `grpo.rollout.episodes.Toolbox`).

    tools: names, "module:function" strings, functions or Tools (their syntaxes may differ: a turn's first
        complete call of any of them is the call).
    max_workers: calls running at once; timeout_s: each call's limit (a hung function's thread is left behind
        and no longer counts against max_workers; the python tool's process is killed);
    max_output_chars: a result longer than this is cut; options: per registered tool name, its factory's options
        (e.g. {"python": {"syntax": "tags"}})."""

    def __init__(self, tools: Sequence[str | Callable[..., Any] | Tool], *, max_workers: int = 4,
                 timeout_s: float = 10.0, max_output_chars: int = 1024,
                 options: dict[str, dict[str, Any]] | None = None):
        if not tools:
            raise ValueError("a Toolbox needs at least one tool")
        if max_workers < 1 or timeout_s <= 0 or max_output_chars < 1:
            raise ValueError(f"Toolbox: max_workers >= 1, timeout_s > 0 and max_output_chars >= 1 are needed; got "
                             f"{max_workers}, {timeout_s}, {max_output_chars}")
        options = options or {}
        unknown = set(options) - {s for s in tools if isinstance(s, str)}
        if unknown:
            raise ValueError(f"Toolbox options for {', '.join(sorted(unknown))}, which are not among its tools")
        self.tools = {t.name: t for t in (resolve_tool(s, timeout_s, max_output_chars,
                                                       options.get(s) if isinstance(s, str) else None)
                                          for s in tools)}
        self.max_workers, self.timeout_s, self.max_output_chars = max_workers, timeout_s, max_output_chars
        self.syntaxes = list(dict.fromkeys(t.syntax for t in self.tools.values()))

    # ----- finding a call -----
    def find_call(self, text: str) -> ToolCall | None:
        """The first complete call in a turn's text, or None. A JSON call that cannot be read, or names no
        tool, is returned with its error (it runs as that error)."""
        found = self._next_call(text, 0)
        return None if found is None else found[0]

    def calls_in(self, text: str) -> list[ToolCall]:
        """Every complete call in a whole episode's text, in order (each call's output, which follows it, is
        skipped): what `find_call` found turn by turn, read back from the text."""
        calls, at = [], 0
        while (found := self._next_call(text, at)) is not None:
            call, at = found
            syntax = self.tools[call.name].syntax if call.name in self.tools else TOOL_CALL_TAGS
            if text.startswith(syntax.output_open, at):
                close = text.find(syntax.output_close, at + len(syntax.output_open))
                at = len(text) if close < 0 else close + len(syntax.output_close)
            calls.append(call)
        return calls

    def _next_call(self, text: str, at: int) -> tuple[ToolCall, int] | None:
        """The first complete call in text[at:] and where it ends, or None."""
        found: tuple[int, CallSyntax, str] | None = None
        for syntax in self.syntaxes:
            start = text.find(syntax.open, at)
            if start < 0:
                continue
            end = text.find(syntax.close, start + len(syntax.open))
            if end >= 0 and (found is None or end < found[0]):
                found = (end, syntax, text[start + len(syntax.open):end])
        if found is None:
            return None
        end, syntax, body = found
        end += len(syntax.close)
        code_tools = [t for t in self.tools.values() if t.syntax == syntax and t.code]
        if code_tools:
            return ToolCall(code_tools[0].name, body), end
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
            if not isinstance(arguments, dict):
                raise TypeError("arguments must be a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            return ToolCall("?", body, error=f"malformed tool call ({exc}); expected "
                                             '{"name": ..., "arguments": {...}}'), end
        if name not in self.tools:
            return ToolCall(str(name), arguments, error=f"unknown tool {name!r}; available: {', '.join(self.tools)}"), end
        return ToolCall(name, arguments), end

    def call_columns(self, completions: list[Any]) -> dict[str, list[Any]]:
        """The ``tool_calls`` column rewards get, read from finished completions' text (per call its name,
        arguments, error and malformed flag; no output): for checking rewards on written completions, where
        no episode ran. `rewards.check_rewards(..., completion_columns=box.call_columns)`."""
        return {"tool_calls": [[{"name": c.name, "arguments": c.arguments, "error": c.error,
                                 "malformed": c.error is not None} for c in self.calls_in(completion_text(t))]
                               for t in completions]}

    def render(self, call: ToolCall, result: ToolResult) -> str:
        syntax = self.tools[call.name].syntax if call.name in self.tools else TOOL_CALL_TAGS
        return f"{syntax.output_open}{result.output}{syntax.output_close}"

    # ----- running calls -----
    def _execute(self, call: ToolCall) -> ToolResult:
        started = time.perf_counter()
        if call.error is not None:
            return ToolResult(call.error, error=True)
        tool = self.tools[call.name]
        try:
            value = tool.fn(call.arguments) if tool.code else tool.fn(**call.arguments)
            output, error = ("" if value is None else str(value)), False
        except ToolError as exc:
            output, error = str(exc), True
        except Exception as exc:  # a user tool's failure is the policy's to read, never the run's
            output, error = f"{type(exc).__name__}: {exc}", True
        return ToolResult(truncate(output, self.max_output_chars), error, time.perf_counter() - started)

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Runs `calls` concurrently, at most max_workers at once, each for at most timeout_s; results in order."""
        results: list[ToolResult | None] = [None] * len(calls)
        done: queue.Queue[tuple[int, ToolResult]] = queue.Queue()
        waiting = list(range(len(calls)))[::-1]
        running: dict[int, float] = {}  # call index -> when it started

        def work(i: int) -> None:
            done.put((i, self._execute(calls[i])))

        while waiting or running:
            while waiting and len(running) < self.max_workers:
                i = waiting.pop()
                running[i] = time.perf_counter()
                threading.Thread(target=work, args=(i,), daemon=True, name=f"tool-{calls[i].name}").start()
            deadline = min(running.values()) + self.timeout_s
            try:
                i, result = done.get(timeout=max(deadline - time.perf_counter(), 0.0))
                if i in running:  # not already given up on
                    del running[i]
                    results[i] = result
            except queue.Empty:
                now = time.perf_counter()
                for i in [i for i, t in running.items() if now - t >= self.timeout_s]:
                    results[i] = ToolResult(f"TimeoutError: the tool {calls[i].name!r} ran past {self.timeout_s:g} s",
                                            error=True, seconds=now - running.pop(i))
        return results  # type: ignore[return-value]
