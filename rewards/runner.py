"""Run several weighted reward functions over a batch: in parallel, each under a timeout, errors named.

:class:`RewardSet` is what a trainer calls once per batch. It returns every function's scores and the
weighted total per sample. A ``None`` score ("not applicable") contributes 0 to the total and is left
out of that function's mean. A function that raises is reported with its name and the first failing
sample's index (found by re-running it one sample at a time); with ``on_error="none"`` the failing
samples score None and training goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewards.base import RewardFn, Score

OnError = Literal["raise", "none"]
ON_ERROR_CHOICES = ("raise", "none")
DEFAULT_TIMEOUT_S = 300.0


class RewardError(RuntimeError):
    """A reward function failed: ``name`` is the function, ``index`` the first failing sample (None: the batch)."""

    def __init__(self, name: str, index: int | None, message: str) -> None:
        where = f"on sample {index}" if index is not None else "on the batch"
        super().__init__(f"reward function {name!r} failed {where}: {message}")
        self.name = name
        self.index = index
        self.reason = message


class RewardTimeoutError(RewardError):
    """A reward function did not return within its timeout."""


@dataclass(frozen=True)
class Reward:
    """One entry of a :class:`RewardSet`: a reward function, its weight, and the name it is logged under."""

    fn: RewardFn
    weight: float = 1.0
    name: str = ""

    def display_name(self) -> str:
        """Return ``name``, or the function's ``__name__`` when no name was given."""
        return self.name or getattr(self.fn, "__name__", type(self.fn).__name__)


@dataclass(frozen=True)
class Failure:
    """A reward function's failure on one sample (``index``) or on the whole batch (``index`` None)."""

    name: str
    index: int | None
    message: str


@dataclass
class RewardScores:
    """The scores of one batch.

    ``per_function[name][i]`` is that function's score of sample ``i`` (None: not applicable or
    failed); ``total[i]`` is the weighted sum over functions, where None counts as 0.
    """

    names: list[str]
    weights: list[float]
    per_function: dict[str, list[Score]]
    total: list[float]
    failures: list[Failure] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def mean(self, name: str) -> float | None:
        """Return the mean of function ``name``'s scores over the samples where it is not None."""
        values = [s for s in self.per_function[name] if s is not None]
        return sum(values) / len(values) if values else None

    def means(self) -> dict[str, float | None]:
        """Return :meth:`mean` of every function."""
        return {name: self.mean(name) for name in self.names}


def _run_awaitable(awaitable: Any) -> Any:
    async def wait_for_it() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait_for_it())
    box: dict[str, Any] = {}  # a loop already runs in this thread: use a fresh thread for this one
    thread = threading.Thread(target=lambda: box.update(value=asyncio.run(wait_for_it())), daemon=True)
    thread.start()
    thread.join()
    if "value" not in box:
        raise RuntimeError("the async reward function failed inside its event loop")
    return box["value"]


def _invoke(
    fn: RewardFn, prompts: list[Any], completions: list[Any], completion_ids: Any, columns: Mapping[str, Any]
) -> Any:
    out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    return _run_awaitable(out) if inspect.isawaitable(out) else out


class _Call:
    """One reward call running in a daemon thread (a hung call cannot be killed, only abandoned)."""

    def __init__(self, fn: RewardFn, args: tuple[Any, ...], name: str) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.started = time.perf_counter()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(fn, args), name=f"reward:{name}", daemon=True)
        self.thread.start()

    def _run(self, fn: RewardFn, args: tuple[Any, ...]) -> None:
        try:
            self.value = _invoke(fn, *args)
        except BaseException as exc:
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - self.started
            self.done.set()


def _validate(name: str, out: Any, n: int) -> tuple[list[Score], list[Failure]]:
    """Check a reward's return value: n entries, each a finite number or None."""
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Iterable):
        raise RewardError(
            name,
            None,
            f"returned a {type(out).__name__}; allowed: a list with one float or None per completion",
        )
    values = list(out)
    if len(values) != n:
        raise RewardError(name, None, f"returned {len(values)} scores for {n} completions")
    scores: list[Score] = []
    failures = []
    for i, v in enumerate(values):
        if v is None:
            scores.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)):
            scores.append(float(v))
        else:
            scores.append(None)
            failures.append(
                Failure(name, i, f"returned {v!r} ({type(v).__name__}); allowed: a finite number or None")
            )
    return scores, failures


def call_reward(
    fn: RewardFn,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: Any = None,
    columns: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    timeout: float | None = None,
) -> list[Score]:
    """Call one reward function (sync or ``async``) on a batch and return its checked scores.

    Raises:
        RewardTimeoutError: it did not return within ``timeout`` seconds (None: no limit).
        RewardError: it raised, or returned something other than one finite number or None per sample.
    """
    name = name or getattr(fn, "__name__", "reward")
    args = (list(prompts), list(completions), completion_ids, dict(columns or {}))
    if timeout is None:
        try:
            out = _invoke(fn, *args)
        except Exception as exc:
            raise RewardError(name, None, f"{type(exc).__name__}: {exc}") from exc
    else:
        call = _Call(fn, args, name)
        if not call.done.wait(timeout):
            raise RewardTimeoutError(name, None, f"no result after {timeout:g} s")
        if call.error is not None:
            raise RewardError(name, None, f"{type(call.error).__name__}: {call.error}") from call.error
        out = call.value
    scores, failures = _validate(name, out, len(completions))
    if failures:
        raise RewardError(name, failures[0].index, failures[0].message)
    return scores


def _sample(columns: Mapping[str, Any], n: int, i: int) -> dict[str, Any]:
    """Slice every per-sample column down to sample ``i``; other values pass through unchanged."""
    return {
        k: v[i : i + 1] if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) and len(v) == n else v
        for k, v in columns.items()
    }


class RewardSet:
    """Weighted reward functions evaluated together on each batch.

    Args:
        rewards: entries given as :class:`Reward`, ``(fn, weight)`` / ``(fn, weight, name)`` tuples,
            or bare functions (weight 1). Names must be unique.
        on_error: ``"raise"`` stops with a :class:`RewardError` naming the function and sample;
            ``"none"`` scores the failing samples None and records a :class:`Failure`.
        timeout: seconds each function may take per batch (None: no limit). A hung function's
            samples all fail; its thread is abandoned (threads cannot be killed; the built-in
            slow rewards kill their own worker processes on timeout).
        parallel: run the functions concurrently, one thread each. Rewards that wait on
            subprocesses (math-verify, code execution) then overlap.
    """

    def __init__(
        self,
        rewards: Iterable[Reward | tuple[Any, ...] | RewardFn],
        *,
        on_error: OnError = "raise",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        parallel: bool = True,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        self.rewards: list[Reward] = []
        for entry in rewards:
            if isinstance(entry, Reward):
                reward = entry
            elif isinstance(entry, tuple) and 1 <= len(entry) <= 3:
                reward = Reward(*entry)
            elif callable(entry):
                reward = Reward(entry)
            else:
                raise TypeError(
                    f"a reward entry is a Reward, a (fn, weight[, name]) tuple or a function; got {entry!r}"
                )
            if not callable(reward.fn):
                raise TypeError(f"reward {reward.name or reward.fn!r}: {reward.fn!r} is not callable")
            if not isinstance(reward.weight, numbers.Real) or not math.isfinite(reward.weight):
                raise ValueError(
                    f"reward {reward.display_name()!r}: weight must be a finite number, got {reward.weight!r}"
                )
            self.rewards.append(reward)
        if not self.rewards:
            raise ValueError("a RewardSet needs at least one reward function")
        seen: set[str] = set()
        for name in self.names:
            if name in seen:
                raise ValueError(f"two rewards are named {name!r}; give each a distinct name")
            seen.add(name)
        self.on_error = on_error
        self.timeout = timeout
        self.parallel = parallel

    @classmethod
    def from_config(
        cls,
        entries: Iterable[str | Mapping[str, Any]],
        *,
        base_dir: str | Path | None = None,
        on_error: OnError = "raise",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        parallel: bool = True,
    ) -> RewardSet:
        """Build a set from recipe entries: a spec string, or ``{reward, weight, name, options}``.

        ``reward`` is anything :func:`rewards.registry.resolve` accepts; ``weight`` defaults to 1 and
        ``name`` to the reward's own name.
        """
        from rewards.registry import resolve

        built = []
        allowed = {"reward", "weight", "name", "options"}
        for entry in entries:
            if isinstance(entry, str):
                entry = {"reward": entry}
            unknown = set(entry) - allowed
            if unknown or "reward" not in entry:
                raise ValueError(
                    f"reward entry {dict(entry)!r}: allowed keys are {sorted(allowed)}, 'reward' is required"
                )
            fn = resolve(entry["reward"], entry.get("options"), base_dir=base_dir)
            built.append(Reward(fn, float(entry.get("weight", 1.0)), entry.get("name") or ""))
        return cls(built, on_error=on_error, timeout=timeout, parallel=parallel)

    @property
    def names(self) -> list[str]:
        """The functions' names, in order."""
        return [r.display_name() for r in self.rewards]

    @property
    def weights(self) -> list[float]:
        """The functions' weights, in order."""
        return [float(r.weight) for r in self.rewards]

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, **columns: Any
    ) -> RewardScores:
        """Score a batch; arguments as TRL passes them to reward functions."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} completions")
        args = (list(prompts), list(completions), completion_ids, columns)
        calls: dict[str, _Call] = {}
        if self.parallel and len(self.rewards) > 1:
            for reward in self.rewards:
                calls[reward.display_name()] = _Call(reward.fn, args, reward.display_name())
        per_function: dict[str, list[Score]] = {}
        failures: list[Failure] = []
        seconds: dict[str, float] = {}
        for reward in self.rewards:
            name = reward.display_name()
            call = calls.get(name) or _Call(reward.fn, args, name)
            remaining = (
                None if self.timeout is None else max(0.0, call.started + self.timeout - time.perf_counter())
            )
            finished = call.done.wait(remaining)
            seconds[name] = call.seconds if finished else time.perf_counter() - call.started
            if not finished:
                error: RewardError = RewardTimeoutError(name, None, f"no result after {self.timeout:g} s")
                self._fail(error, None)
                failures.append(Failure(name, None, error.reason))
                per_function[name] = [None] * n
                continue
            if call.error is None:
                try:
                    scores, bad = _validate(name, call.value, n)
                except RewardError as exc:
                    self._fail(exc, None)
                    scores, bad = [None] * n, [Failure(name, None, exc.reason)]
            else:
                scores, bad = self._per_sample(reward, name, args, call.error)
            if bad:
                self._fail(RewardError(name, bad[0].index, bad[0].message), call.error)
            per_function[name] = scores
            failures.extend(bad)
        total = [
            sum(
                w * s
                for w, s in zip(self.weights, (per_function[nm][i] for nm in self.names))
                if s is not None
            )
            for i in range(n)
        ]
        return RewardScores(
            self.names, self.weights, per_function, [float(t) for t in total], failures, seconds
        )

    def _fail(self, error: RewardError, cause: BaseException | None) -> None:
        if self.on_error == "raise":
            raise error from cause

    def _per_sample(
        self, reward: Reward, name: str, args: tuple[Any, ...], error: BaseException
    ) -> tuple[list[Score], list[Failure]]:
        """After a batch call raised: score each sample alone to find which ones fail."""
        prompts, completions, completion_ids, columns = args
        n = len(completions)
        scores: list[Score] = [None] * n
        failures: list[Failure] = []
        if n > 1:
            for i in range(n):
                ids = completion_ids[i : i + 1] if completion_ids is not None else None
                try:
                    scores[i] = call_reward(
                        reward.fn,
                        prompts[i : i + 1],
                        completions[i : i + 1],
                        ids,
                        _sample(columns, n, i),
                        name=name,
                        timeout=self.timeout,
                    )[0]
                except RewardError as exc:
                    failures.append(Failure(name, i, exc.reason))
                    if self.on_error == "raise":
                        break
        if not failures:
            index = 0 if n == 1 else None
            failures.append(Failure(name, index, f"{type(error).__name__}: {error}"))
        return scores, failures
