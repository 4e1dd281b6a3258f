"""Multi-turn tool-use episodes over our `Engine`, token in and token out: the policy generates until a tool
call is complete, the call runs, its output is appended to the sequence as tokens, and generation goes on
from the cached prefix (only the output tokens are prefilled). What the trainer sees is exactly the sampled
tokens plus the appended tool tokens, with a mask saying which are which; nothing is re-rendered.

The tools themselves (what a call looks like, how it runs) are a `Toolbox` (`grpo.tools` builds one)."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from .engine import PAUSE
from .outputs import Completion, RequestOutput
from .sampling_params import SamplingParams
from .sequence import Sequence


@dataclass
class ToolCall:
    """A complete call found in a turn's text. arguments: the code (a code tool) or the decoded JSON
    arguments; error: why the call could not be read (a malformed call runs as that error)."""

    name: str
    arguments: Any
    error: str | None = None


@dataclass
class ToolResult:
    """What a call returned: its output text (the error's text when it failed), and how long it ran."""

    output: str
    error: bool = False
    seconds: float = 0.0


class Toolbox(Protocol):
    """The tools of an episode: finds a complete call in a turn's text, runs a step's calls (concurrently; never
    raises: a failure is a `ToolResult` with error=True) and writes a result as the text the policy reads."""

    def find_call(self, text: str) -> ToolCall | None: ...

    def run(self, calls: list[ToolCall]) -> list[ToolResult]: ...

    def render(self, call: ToolCall, result: ToolResult) -> str: ...


@dataclass
class EpisodeCompletion(Completion):
    """A completion that may hold tool output. token_ids holds the sampled and the tool tokens in order;
    logprobs is 0.0 at tool tokens. tool_mask[t]: token t is tool output (no loss, no KL on it).
    tool_calls: per call its name, arguments, output, error, malformed (the call could not be read) and seconds,
    in order."""

    tool_mask: list[bool] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    turns: list[tuple[str, list[int]]] = field(default_factory=list)  # ("policy" | "tool", token ids), in order


@dataclass
class _EpisodeState:
    turn_start: int  # index in token_ids where the current policy turn began
    prompt_len: int
    tool_spans: list[tuple[int, int]] = field(default_factory=list)  # completion positions [start, end)
    calls: list[dict[str, Any]] = field(default_factory=list)
    pending: ToolCall | None = None


class EpisodeLoop:
    """The hooks `Engine.generate(..., episodes=...)` calls; one per generate call.

    max_tool_calls: calls run per completion; a further complete call ends the episode (finish "stop").
    The total token budget is the request's `SamplingParams.max_tokens`: sampled and tool tokens together;
    tool output that does not fit is cut to leave room for one sampled token.
    overlap: run each call in the background (at most the toolbox's max_workers at once) while the other
    sequences decode, each resuming when its own call returns, instead of the whole batch waiting for a
    step's calls. Which sequences share a decode step then depends on how long the tools take, so a seeded
    run repeats only as far as the logits do not depend on the batch (on a CPU: exactly, in our tests)."""

    def __init__(self, tokenizer, toolbox: Toolbox, max_tool_calls: int = 4, overlap: bool = False):
        if max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be >= 0, got {max_tool_calls}")
        self.tokenizer, self.toolbox, self.max_tool_calls = tokenizer, toolbox, max_tool_calls
        self.states: dict[tuple[int, int], _EpisodeState] = {}
        self.tool_seconds = 0.0  # wall time the engine spent waiting for tools (overlap: with nothing to decode)
        self.steps_beside_tools = 0  # overlap: engine steps taken while a call was out
        self.overlaps = overlap
        self._calls: dict[Future[list[ToolResult]], Sequence] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _state(self, seq: Sequence) -> _EpisodeState:
        key = (seq.request_index, seq.sample_index)
        if key not in self.states:
            self.states[key] = _EpisodeState(turn_start=seq.prompt_len, prompt_len=seq.prompt_len)
        return self.states[key]

    def on_token(self, seq: Sequence) -> str | None:
        state = self._state(seq)
        call = self.toolbox.find_call(self.tokenizer.decode(seq.token_ids[state.turn_start:]))
        if call is None:
            return None
        if len(state.calls) >= self.max_tool_calls:
            return "stop"
        state.pending = call
        return PAUSE

    def resume(self, paused: list[Sequence]) -> list[str | None]:
        calls = [self._state(s).pending for s in paused]
        started = time.perf_counter()
        results = self.toolbox.run(calls)  # type: ignore[arg-type]
        self.tool_seconds += time.perf_counter() - started
        return [self._take(seq, result) for seq, result in zip(paused, results)]

    def submit(self, paused: list[Sequence]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(getattr(self.toolbox, "max_workers", 4), thread_name_prefix="episode-tool")
        for seq in paused:
            self._calls[self._pool.submit(self.toolbox.run, [self._state(seq).pending])] = seq  # type: ignore[list-item]

    def poll(self, block: bool) -> list[tuple[Sequence, str | None]]:
        started = time.perf_counter()
        done, _ = wait(self._calls, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        if block:
            self.tool_seconds += time.perf_counter() - started
        else:
            self.steps_beside_tools += 1  # the engine decodes next, with calls still out
        back = sorted(((self._calls.pop(f), f.result()[0]) for f in done),
                      key=lambda pair: (pair[0].request_index, pair[0].sample_index))  # done is a set: a fixed order
        return [(seq, self._take(seq, result)) for seq, result in back]

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def close(self) -> None:
        """Stops the background pool (overlap); calls still running are left to finish on their own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _take(self, seq: Sequence, result: ToolResult) -> str | None:
        """Appends the output of `seq`'s pending call; None to go on, or "length" when no room is left."""
        state = self._state(seq)
        call, state.pending = state.pending, None
        assert call is not None
        state.calls.append({"name": call.name, "arguments": call.arguments, "output": result.output,
                            "error": result.error, "malformed": call.error is not None, "seconds": result.seconds})
        ids = self.tokenizer.encode(self.toolbox.render(call, result), add_special_tokens=False)
        room = seq.params.max_tokens - seq.num_completion_tokens - 1  # keep one sampled token
        if room <= 0:
            return "length"
        ids = ids[:room]
        start = seq.num_completion_tokens
        for token in ids:
            seq.append(token, 0.0)
        state.tool_spans.append((start, start + len(ids)))
        state.turn_start = seq.num_tokens
        return None

    def completion(self, request: int, sample: int, c: Completion) -> EpisodeCompletion:
        """Completion `c` of (request, sample) with its tool mask, calls and turns."""
        state = self.states.get((request, sample))
        spans = state.tool_spans if state is not None else []
        mask = [False] * len(c.token_ids)
        turns: list[tuple[str, list[int]]] = []
        at = 0
        for start, end in spans:
            mask[start:end] = [True] * (end - start)
            if start > at:
                turns.append(("policy", c.token_ids[at:start]))
            turns.append(("tool", c.token_ids[start:end]))
            at = end
        if at < len(c.token_ids):
            turns.append(("policy", c.token_ids[at:]))
        return EpisodeCompletion(c.token_ids, c.logprobs, c.finish_reason, c.text, c.routed_experts,
                                 tool_mask=mask, tool_calls=list(state.calls) if state else [], turns=turns)


def generate_episodes(engine, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                      toolbox: Toolbox, max_tool_calls: int = 4, *, overlap: bool = False,
                      use_tqdm: bool = False) -> tuple[list[RequestOutput], dict[str, float]]:
    """Like `engine.generate`, with tool calls: every completion is an `EpisodeCompletion`. Also returns
    {"tool_seconds": wall time the engine waited for tools, "steps_beside_tools": engine steps taken while a
    call was out (overlap; else 0)}. overlap: see `EpisodeLoop`.

    Raises:
        ValueError: the engine cannot pause a sequence for a tool (vLLM's backend); its message names the key."""
    if not getattr(engine, "runs_episodes", False):
        raise ValueError(f"{type(engine).__name__} does not run multi-turn tool episodes (the recipe's `tools`); "
                         "use rollout.backend: ours")
    if engine.tokenizer is None:
        raise ValueError("tool episodes need a tokenizer: Engine(model, tokenizer)")
    loop = EpisodeLoop(engine.tokenizer, toolbox, max_tool_calls, overlap=overlap)
    try:
        outputs = engine.generate(prompts, params, use_tqdm=use_tqdm, episodes=loop)
    finally:
        loop.close()
    for i, out in enumerate(outputs):
        out.completions = [loop.completion(i, k, c) for k, c in enumerate(out.completions)]
    return outputs, {"tool_seconds": loop.tool_seconds, "steps_beside_tools": loop.steps_beside_tools}
