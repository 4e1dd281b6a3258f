"""A few long-lived worker processes that run slow, possibly hanging functions with a hard timeout.

math-verify guards its parsing with ``signal.alarm``, which only works in a main thread; a trainer
calls rewards from threads. So verification runs here, in the main thread of a worker process, and a
task that overruns its deadline gets its worker killed (SIGKILL) and replaced. Workers are plain
``python -c`` subprocesses talking pickles over pipes: no ``multiprocessing`` start method, so the
caller's ``__main__`` is never re-imported.
"""

from __future__ import annotations

import atexit
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])
_BOOTSTRAP = (  # drop '' (the current directory) from the path: a local math.py must not shadow the stdlib
    "import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p]; "
    "from rewards.workers import _worker_main; _worker_main(sys.argv[2:])"
)
_READY = "ready"
STARTUP_TIMEOUT_S = 120.0
"""How long a new worker may take to import its preloaded modules before it is declared broken."""


@dataclass
class TaskResult:
    """The outcome of one task: ``value`` when ``ok``; else ``error`` says why (``timed_out`` if it overran)."""

    ok: bool
    value: Any = None
    error: str | None = None
    timed_out: bool = False


class WorkerError(RuntimeError):
    """A worker process could not be started or kept running."""


class _Worker:
    """One worker subprocess and the two pipe ends the parent uses to talk to it."""

    def __init__(self, preload: Sequence[str], memory_bytes: int | None) -> None:
        args = [sys.executable, "-c", _BOOTSTRAP, _PACKAGE_PARENT, str(memory_bytes or 0), *preload]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # no terminal signals (Ctrl-C) reach workers
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.send_conn = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.recv_conn = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (index, deadline)

    def kill(self) -> None:
        """Kill the worker process and close the pipes."""
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for conn in (self.send_conn, self.recv_conn):
            try:
                conn.close()
            except OSError:
                pass


class WorkerPool:
    """Runs module-level functions in ``size`` worker processes, each task under its own deadline.

    Args:
        size: number of worker processes.
        preload: modules each worker imports before it reports ready (so import time never counts
            against a task's timeout).
        memory_bytes: address-space limit set in each worker (RLIMIT_AS), so one pathological input
            cannot exhaust the machine's memory; None for no limit.

    Thread-safe: concurrent :meth:`map` calls take turns.
    """

    def __init__(self, size: int, preload: Sequence[str] = (), memory_bytes: int | None = 4 << 30) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least 1 worker, got size={size}")
        self.size = size
        self.preload = tuple(preload)
        self.memory_bytes = memory_bytes
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the workers now (otherwise the first :meth:`map` starts them) and wait until ready."""
        with self._lock:
            self._fill()
            self._await_ready(time.monotonic() + STARTUP_TIMEOUT_S)

    def _fill(self) -> None:
        if self._closed:
            raise WorkerError("this worker pool was closed")
        for worker in [w for w in self._workers if w.proc.poll() is not None]:
            worker.kill()
            self._workers.remove(worker)
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.preload, self.memory_bytes))

    def _await_ready(self, deadline: float) -> None:
        while True:
            starting = [w for w in self._workers if not w.ready]
            if not starting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{len(starting)} worker(s) did not start within {STARTUP_TIMEOUT_S:.0f} s")
            for conn in wait([w.recv_conn for w in starting], timeout=remaining):
                worker = next(w for w in starting if w.recv_conn is conn)
                self._on_ready(worker)

    def _on_ready(self, worker: _Worker) -> None:
        try:
            message = worker.recv_conn.recv()
        except (EOFError, OSError):
            message = None
        if message != _READY:
            worker.kill()
            self._workers.remove(worker)
            raise WorkerError(
                f"a worker process failed to start (exit code {worker.proc.returncode}); "
                "run `python -c 'import rewards.workers'` to see the error"
            )
        worker.ready = True

    def map(
        self, fn: Callable[..., Any], arg_tuples: Sequence[tuple[Any, ...]], timeout: float
    ) -> list[TaskResult]:
        """Run ``fn(*args)`` for each args tuple; return one :class:`TaskResult` per tuple, in order.

        ``fn`` must be a module-level function (workers import it by name). A task that runs longer
        than ``timeout`` seconds gets ``TaskResult(ok=False, timed_out=True)`` and its worker is
        replaced; an exception inside ``fn`` gives ``ok=False`` with the error text.
        """
        ref = (fn.__module__, fn.__qualname__)
        if "<" in fn.__qualname__:
            raise ValueError(f"{fn.__qualname__} is not a module-level function; workers cannot import it")
        results: list[TaskResult | None] = [None] * len(arg_tuples)
        if not arg_tuples:
            return []
        with self._lock:
            self._fill()
            try:
                self._run(ref, arg_tuples, timeout, results)
            finally:
                for worker in [w for w in self._workers if w.task]:  # interrupted: drop stale replies
                    self._replace(worker)
        return [r if r is not None else TaskResult(False, error="not run") for r in results]

    def _run(
        self,
        ref: tuple[str, str],
        arg_tuples: Sequence[tuple[Any, ...]],
        timeout: float,
        results: list[TaskResult | None],
    ) -> None:
        pending = deque(range(len(arg_tuples)))
        while pending or any(w.task for w in self._workers):
            now = time.monotonic()
            for worker in list(self._workers):
                if not (worker.ready and worker.task is None and pending):
                    continue
                index = pending.popleft()
                try:
                    message = pickle.dumps((ref, arg_tuples[index]))
                except Exception as exc:
                    results[index] = TaskResult(False, error=f"cannot send the arguments: {exc}")
                    continue
                try:
                    worker.send_conn.send_bytes(message)
                except OSError:
                    pending.appendleft(index)
                    self._replace(worker)
                    continue
                worker.task = (index, now + timeout)
            deadlines = [w.task[1] for w in self._workers if w.task]
            deadlines += [w.started + STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
            watched = [w.recv_conn for w in self._workers if w.task or not w.ready]
            for conn in wait(watched, timeout=wait_s) if watched else []:
                worker = next(w for w in self._workers if w.recv_conn is conn)
                if not worker.ready:
                    self._on_ready(worker)
                    continue
                assert worker.task is not None
                index = worker.task[0]
                try:
                    ok, payload = worker.recv_conn.recv()
                except (EOFError, OSError):
                    code = worker.proc.poll()
                    results[index] = TaskResult(False, error=f"worker process died (exit code {code})")
                    self._replace(worker)
                    continue
                worker.task = None
                results[index] = TaskResult(True, value=payload) if ok else TaskResult(False, error=payload)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task and worker.task[1] <= now:
                    results[worker.task[0]] = TaskResult(
                        False, error=f"timed out after {timeout:g} s", timed_out=True
                    )
                    self._replace(worker)
                elif not worker.ready and worker.started + STARTUP_TIMEOUT_S <= now:
                    raise WorkerError(f"a worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _replace(self, worker: _Worker) -> None:
        worker.task = None
        worker.kill()
        self._workers.remove(worker)
        self._workers.append(_Worker(self.preload, self.memory_bytes))

    def pids(self) -> list[int]:
        """Return the process ids of the current workers."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Kill every worker; the pool cannot be used afterwards."""
        with self._lock:
            self._closed = True
            for worker in self._workers:
                worker.kill()
            self._workers = []


_shared: dict[tuple[int, tuple[str, ...]], WorkerPool] = {}
_shared_lock = threading.Lock()


def default_pool_size() -> int:
    """Return the default number of workers: the CPU count, at least 1 and at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def shared_pool(preload: Sequence[str] = ()) -> WorkerPool:
    """Return the process-wide pool for ``preload`` (created on first use, closed at exit).

    A forked child gets its own pool: the parent's workers and pipes are never shared.
    """
    key = (os.getpid(), tuple(preload))
    with _shared_lock:
        pool = _shared.get(key)
        if pool is None or pool._closed:
            pool = _shared[key] = WorkerPool(default_pool_size(), preload)
        return pool


@atexit.register
def _close_shared() -> None:
    for (pid, _), pool in list(_shared.items()):
        if pid == os.getpid():
            pool.close()


def _worker_main(argv: list[str]) -> None:
    """Entry point of a worker process: import ``argv[1:]``, then serve tasks until stdin closes."""
    memory_bytes = int(argv[0])
    if memory_bytes > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    recv_conn = Connection(os.dup(0), writable=False)
    send_conn = Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # stray prints go to stderr, not into the protocol pipe
    import importlib

    for module in argv[1:]:
        importlib.import_module(module)
    send_conn.send(_READY)
    functions: dict[tuple[str, str], Callable[..., Any]] = {}
    while True:
        try:
            (module, qualname), args = recv_conn.recv()
        except EOFError:
            return
        try:
            fn = functions.get((module, qualname))
            if fn is None:
                fn = importlib.import_module(module)
                for part in qualname.split("."):
                    fn = getattr(fn, part)
                functions[(module, qualname)] = fn
            reply = (True, fn(*args))
        except BaseException as exc:
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            send_conn.send(reply)
        except pickle.PicklingError as exc:
            send_conn.send((False, f"cannot return the result: {exc}"))
