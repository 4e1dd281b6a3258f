"""Code reward: run the completion's Python code against test cases in a sandboxed subprocess.

Each run happens in a fresh process with: a filesystem view of its own (``rewards.sandbox_fs``: its
empty working directory, the Python install and /usr, nothing else; built by bubblewrap, or by
``unshare --mount`` as root); an empty environment; an empty temporary working
directory (the only place it may write); CPU-time, address-space, file-size, open-file and
process-count limits; root dropped to a throw-away uid; its own network namespace when ``unshare``
is allowed (no network at all); an audit hook refusing new processes, sockets, ``ctypes`` and writes
outside the working directory; and a wall-clock timeout after which its whole process group and
every process of its uid are killed.

What it does not stop: native code the solution manages to load despite the hook can escape the
Python-level rules, but not the uid, the limits, the filesystem view or the network namespace. Where
no filesystem view can be built (mode ``none``, warned once), the code can read what its uid can read.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rewards.base import RewardFn, Score, column, completion_text, logger, named
from rewards.extract import answer_section
from rewards.registry import register
from rewards.sandbox_fs import (
    CHILD_PATH,
    SandboxUnavailable,  # noqa: F401  (raised by sandbox_mode and require_strict; importable from here)
    build_command,
    require_strict,
    sandbox_mode,
    visible_roots,
)

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
TEST_COLUMNS = ("test_cases", "tests", "test_list", "input_output", "verification_info")
"""Dataset columns tried, in order, for a sample's tests when the reward is not told which to use."""
PYTHON_FENCES = ("python", "py", "python3", "")
PYTHON_FLAGS = (sys.executable, "-I", "-S", "-B")
"""``-S``: no ``site`` import, whose ``.pth`` files (editable installs' finders) took half a run's start-up."""
SITE_PATHS = list(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")))
"""Put on the child's ``sys.path`` instead, so installed packages (numpy) still import."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run (a program run per stdio test; one run for a whole assert suite)."""

    cpu_seconds: int = 5
    """CPU time (RLIMIT_CPU): SIGXCPU at this, SIGKILL one second later."""
    wall_seconds: float = 10.0
    """Wall-clock time before the process group is killed."""
    memory_bytes: int = 1 << 30
    """Address space (RLIMIT_AS)."""
    file_bytes: int = 16 << 20
    """Largest file it may write, stdout included (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    processes: int = 32
    """Processes and threads of its uid (RLIMIT_NPROC; enforced because root is dropped)."""
    output_bytes: int = 1 << 20
    """How much of stdout and stderr is read back."""


@dataclass
class SandboxResult:
    """What one sandboxed run did."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    pid: int
    records: list[str] = field(default_factory=list)
    """Lines the sandbox program wrote on its result channel (test results, probe report)."""


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_UID_RANGE = (61000, 65000)


def _allocate_uid() -> int | None:
    """Pick an unused throw-away uid for one run (root only), so its processes can be swept after."""
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        while True:
            uid = random.randrange(*_UID_RANGE)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (a run's leftovers that left its process group)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            os.kill(int(entry.name), signal.SIGKILL)
                        break
        except (OSError, ValueError):
            continue


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def _stop_namespace(proc: subprocess.Popen) -> None:
    """Kill a contained run's namespace init (bwrap's or unshare's child) and let its parent reap it.

    The kernel then kills every process in the namespace. Killing the whole process group at once
    would orphan that init as a zombie under an init process that may never reap it.
    """
    for child in _children(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_prefixes: dict[str, list[str]] = {}
_prefix_lock = threading.Lock()


def _works(command: list[str]) -> bool:
    try:
        return subprocess.run(command, check=False, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def network_isolation_prefix() -> list[str]:
    """Return the command prefix that gives a run its own empty network namespace, or [] if not allowed here.

    ``unshare --net`` as root, else ``unshare --map-root-user --net`` (user namespaces); checked once.
    """
    with _prefix_lock:
        if "net" not in _prefixes:
            unshare = shutil.which("unshare")
            flags = ["--net"] if os.geteuid() == 0 else ["--map-root-user", "--net"]
            ok = unshare is not None and _works([unshare, *flags, "--", "true"])
            _prefixes["net"] = [unshare, *flags, "--"] if ok and unshare else []
        return list(_prefixes["net"])


def _readable_by_others(path: str) -> bool:
    """True if a user other than the owner can read ``path`` (every parent directory searchable)."""
    current = Path(path).resolve()
    for part in [current, *current.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        needed = (stat.S_IXOTH | stat.S_IROTH) if part == current else stat.S_IXOTH
        if mode & needed != needed:
            return False
    return True


def privilege_mode() -> str:
    """How a run stops being root: ``setuid`` (the child drops to a throw-away uid itself), ``setpriv``
    (started as that uid, keeping only the right to read files, for a Python installed where other
    users cannot read it), or ``none`` (not root, or neither works here). Checked once.

    In a filesystem view (``sandbox_mode()`` not ``none``) the Python install is readable by any uid,
    so root always drops with ``setuid`` and no capability that reads past file permissions is kept.
    """
    if os.geteuid() == 0 and sandbox_mode() != "none":
        return "setuid"
    with _prefix_lock:
        if "mode" not in _prefixes:
            mode = "none"
            if os.geteuid() == 0:
                paths = [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
                setpriv = shutil.which("setpriv")
                if all(_readable_by_others(p) for p in [*paths, sys.executable]):
                    mode = "setuid"
                elif setpriv and _works(
                    [*_setpriv_prefix(setpriv, 65534), sys.executable, "-I", "-c", "import json, fractions"]
                ):
                    mode = "setpriv"
            if mode == "none" and os.geteuid() == 0:
                logger.warning(
                    "code sandbox: running as root and cannot drop to another uid (Python is not readable by "
                    "other users and setpriv is unavailable); only the audit hook, the resource limits and the "
                    "process-group kill contain the code, and RLIMIT_NPROC is not enforced for root"
                )
            _prefixes["mode"] = [mode]
        return _prefixes["mode"][0]


def _setpriv_prefix(setpriv: str, uid: int) -> list[str]:
    caps = "+dac_read_search"
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        "--",
    ]


def _read(f: Any, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", "replace")


def run_sandboxed(
    job: dict[str, Any], stdin: str = "", limits: SandboxLimits = SandboxLimits()
) -> SandboxResult:
    """Run the sandbox program (``sandbox_child.py``) on ``job`` in a fresh, limited process.

    ``job["mode"]`` is ``program`` (run ``job["code"]`` with ``stdin``), ``tests`` or ``probe``. The
    job, stdin, stdout, stderr and result channel are unlinked temporary files passed as descriptors,
    so the solution cannot find them by path.
    """
    view = sandbox_mode()
    mode = privilege_mode()
    root = Path(tempfile.mkdtemp(prefix="rewards-sandbox-"))
    uid = _allocate_uid() if mode != "none" else None
    started = time.monotonic()
    proc = None
    try:
        work = root / "work"
        work.mkdir()
        if uid is not None:
            os.chown(work, uid, uid)
            os.chmod(root, 0o711)
        with contextlib.ExitStack() as stack:
            names = ("job", "stdin", "stdout", "stderr", "results")
            files = {name: stack.enter_context(tempfile.TemporaryFile(dir=root)) for name in names}
            files["job"].write(
                json.dumps(
                    {
                        **job,
                        "uid": uid if mode == "setuid" else None,
                        "limits": asdict(limits),
                        "site_paths": SITE_PATHS,
                    }
                ).encode()
            )
            files["stdin"].write(stdin.encode())
            for name in ("job", "stdin"):
                files[name].flush()
                files[name].seek(0)
            job_fd, result_fd = files["job"].fileno(), files["results"].fileno()
            fds = [str(job_fd), str(result_fd)]
            if view != "none":
                staging = root / "staging"
                staging.mkdir()
                argv = [*PYTHON_FLAGS, CHILD_PATH, *fds]
                command = build_command(view, str(work), str(CHILD_SCRIPT), argv, str(staging))
            else:
                command = [*network_isolation_prefix()]
                if mode == "setpriv" and uid is not None:
                    command += _setpriv_prefix(shutil.which("setpriv") or "setpriv", uid)
                command += [*PYTHON_FLAGS, str(CHILD_SCRIPT), *fds]
            proc = subprocess.Popen(
                command,
                stdin=files["stdin"],
                stdout=files["stdout"],
                stderr=files["stderr"],
                cwd=work,
                env={},
                pass_fds=(job_fd, result_fd),
                start_new_session=True,
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                if view != "none":
                    _stop_namespace(proc)
                _kill_group(proc.pid)
                if uid is not None:
                    _kill_uid(uid)
                proc.wait()
            return SandboxResult(
                returncode=returncode,
                stdout=_read(files["stdout"], limits.output_bytes),
                stderr=_read(files["stderr"], limits.output_bytes),
                timed_out=timed_out,
                seconds=time.monotonic() - started,
                pid=proc.pid,
                records=_read(files["results"], limits.output_bytes * 4).splitlines(),
            )
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)
        _release_uid(uid)


def run_program(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run Python ``code`` as a program in the sandbox, feeding it ``stdin``."""
    return run_sandboxed({"mode": "program", "code": code}, stdin, limits)


def sandbox_report(limits: SandboxLimits = SandboxLimits()) -> dict[str, Any]:
    """Return what a sandboxed process sees: its uid, environment, limits, network namespace and files.

    Also ``parent_net_namespace``, to compare: a different value means the run had no network;
    ``mode``, the filesystem containment (``bwrap``, ``unshare`` or ``none``: see ``rewards.sandbox_fs``);
    ``visible``, the paths bound into its view (``["/ (everything its uid may read)"]`` in ``none``);
    and ``root_entries``, what the run itself lists in ``/``.
    """
    result = run_sandboxed({"mode": "probe"}, "", limits)
    if not result.records:
        raise RuntimeError(
            f"the sandbox probe reported nothing (exit code {result.returncode}): {result.stderr[-2000:]}"
        )
    report = json.loads(result.records[0])
    try:
        report["parent_net_namespace"] = os.readlink("/proc/self/ns/net")
    except OSError:
        report["parent_net_namespace"] = None
    report["mode"] = sandbox_mode()
    report["privileges"] = privilege_mode()
    report["visible"] = visible_roots() if report["mode"] != "none" else ["/ (everything its uid may read)"]
    return report


# ---- test suites -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestSuite:
    """A sample's tests: ``stdio`` cases are (input, expected output) pairs; ``assert`` cases are statements."""

    kind: Literal["stdio", "assert"]
    cases: tuple[Any, ...]


TEST_FORMATS = (
    "a list of assert statements; a list of {'input', 'output'} dicts; {'inputs': [...], 'outputs': [...]}; "
    "{'test_cases': ...} (any of these); or a JSON string of any of these"
)


def parse_tests(value: Any) -> TestSuite:
    """Read a dataset's test field into a :class:`TestSuite` (accepted forms: :data:`TEST_FORMATS`).

    Raises:
        ValueError: the value has none of the accepted forms.
    """
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{":
            try:
                return parse_tests(json.loads(text))
            except json.JSONDecodeError:
                pass
        if text:
            return TestSuite("assert", (text,))
    elif isinstance(value, dict):
        if "test_cases" in value:
            return parse_tests(value["test_cases"])
        if "inputs" in value and "outputs" in value and len(value["inputs"]) == len(value["outputs"]):
            return TestSuite(
                "stdio", tuple((str(i), str(o)) for i, o in zip(value["inputs"], value["outputs"]))
            )
    elif isinstance(value, (list, tuple)) and value:
        if all(isinstance(t, str) for t in value):
            return TestSuite("assert", tuple(value))
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in value):
            return TestSuite("stdio", tuple((str(t["input"]), str(t["output"])) for t in value))
    raise ValueError(f"cannot read tests from {str(value)[:200]!r}; accepted: {TEST_FORMATS}")


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _split_assert(statement: str) -> tuple[dict[str, str], Any]:
    """Turn ``assert EXPR == LITERAL`` into a value test (the child never sees the expected value)."""
    try:
        tree = ast.parse(statement)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return {"kind": "assert", "code": statement}, None
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert):
        test = tree.body[0].test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            left, right = test.left, test.comparators[0]
            for expr, expected in ((left, right), (right, left)):
                ok, value = _literal(expected)
                if ok and not _literal(expr)[0]:
                    return {"kind": "value", "expr": ast.unparse(expr)}, value
    return {"kind": "assert", "code": statement}, None


def _same_output(got: str, expected: str) -> bool:
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.strip().splitlines()]

    return norm(got) == norm(expected)


def run_assert_tests(code: str, tests: Sequence[str], limits: SandboxLimits = SandboxLimits()) -> list[bool]:
    """Run assert-statement tests against ``code`` in one sandboxed process; return pass/fail per test.

    Tests of the form ``assert EXPR == LITERAL`` are judged here: the sandbox reports ``EXPR``'s value
    and never sees the expected one, so a solution cannot fake a pass by exiting early or by
    printing. Other statements are run in the sandbox and their pass is tagged with a secret nonce;
    those are weaker: a solution that digs through the sandbox program's frames could forge one.
    """
    split = [_split_assert(t) for t in tests]
    nonce = secrets.token_hex(16)
    job = {
        "mode": "tests",
        "code": code,
        "tests": [s for s, _ in split],
        "nonce": nonce,
        "test_seconds": max(0.1, float(limits.cpu_seconds)),
        "max_repr": limits.output_bytes,
    }
    result = run_sandboxed(job, "", limits)
    passed = [False] * len(tests)
    seen: set[int] = set()
    for record in result.records:
        parts = record.split("\t", 2)
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) >= len(tests) or int(parts[0]) in seen:
            continue
        i, status, payload = int(parts[0]), parts[1], parts[2]
        seen.add(i)
        spec, expected = split[i]
        if spec["kind"] == "value" and status == "value":
            try:
                ok, got = _literal(ast.parse(json.loads(payload), mode="eval").body)
                passed[i] = ok and type(got) is not type(NotImplemented) and bool(got == expected)
            except Exception:
                passed[i] = False
        elif spec["kind"] == "assert":
            passed[i] = status == "pass" and payload == nonce
    return passed


def run_stdio_tests(
    code: str, cases: Sequence[tuple[str, str]], limits: SandboxLimits = SandboxLimits()
) -> list[bool]:
    """Run ``code`` once per (input, expected output) case; a case passes on exit 0 and matching output.

    Output is compared line by line, ignoring trailing whitespace. After a timeout the remaining
    cases are not run (counted as failed): a solution too slow once is too slow again.
    """
    passed = []
    timed_out = False
    for stdin, expected in cases:
        if timed_out:
            passed.append(False)
            continue
        result = run_program(code, stdin, limits)
        timed_out = result.timed_out
        passed.append(
            not result.timed_out and result.returncode == 0 and _same_output(result.stdout, expected)
        )
    return passed


def extract_code(text: str, languages: Sequence[str] = PYTHON_FENCES) -> str | None:
    """Return the last fenced code block (```python ... ```) after ``</think>``, or None if there is none.

    Only blocks whose fence names one of ``languages`` ("" = no language given) count.
    """
    blocks: list[str] = []
    current: list[str] | None = None
    language = ""
    for line in answer_section(text).splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```"):
                current, language = [], stripped[3:].strip().lower()
        elif stripped == "```":
            if language in languages:
                blocks.append("\n".join(current))
            current = None
        else:
            current.append(line)
    return blocks[-1] if blocks and blocks[-1].strip() else None


def score_code(
    code: str | None, tests: TestSuite, limits: SandboxLimits = SandboxLimits(), scoring: str = "fraction"
) -> float:
    """Run ``code`` on ``tests``; return the share of tests passed (``fraction``) or 1/0 (``all``)."""
    if code is None or not tests.cases:
        return 0.0
    if tests.kind == "assert":
        passed = run_assert_tests(code, tests.cases, limits)
    else:
        passed = run_stdio_tests(code, tests.cases, limits)
    if scoring == "all":
        return float(all(passed))
    return sum(passed) / len(passed)


@register("code")
def make_code_reward(
    tests_column: str | None = None,
    scoring: str = "fraction",
    cpu_seconds: int = 5,
    wall_seconds: float = 10.0,
    memory_mb: int = 1024,
    parallel: int | None = None,
    sandbox: str = "auto",
) -> RewardFn:
    """Build the code reward: run each completion's last Python block against the sample's tests.

    Args:
        tests_column: column with the tests (forms: :data:`TEST_FORMATS`); default: the first of
            :data:`TEST_COLUMNS` present.
        scoring: ``fraction`` (share of tests passed) or ``all`` (1.0 only if every test passes).
        cpu_seconds, wall_seconds, memory_mb: limits of each sandboxed run (see :class:`SandboxLimits`).
        parallel: how many completions run at once (default: the CPU count).
        sandbox: ``auto`` (hide the filesystem where this machine allows, else warn and run) or
            ``strict`` (refuse to build the reward where it cannot: :class:`SandboxUnavailable`).

    A completion without a fenced code block scores 0.0.
    """
    if scoring not in ("fraction", "all"):
        raise ValueError(f"scoring must be 'fraction' or 'all', got {scoring!r}")
    if sandbox not in ("auto", "strict"):
        raise ValueError(f"code reward option sandbox must be 'auto' or 'strict', got {sandbox!r}")
    if sandbox == "strict":
        require_strict("code reward option sandbox")
    limits = SandboxLimits(cpu_seconds=cpu_seconds, wall_seconds=wall_seconds, memory_bytes=memory_mb << 20)
    columns_tried = (tests_column,) if tests_column else TEST_COLUMNS
    workers = parallel or os.cpu_count() or 1

    def code_reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **columns: Any
    ) -> list[Score]:
        suites = [parse_tests(t) for t in column(columns, columns_tried, len(completions), "code")]
        programs = [extract_code(completion_text(c)) for c in completions]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(
                pool.map(lambda job: score_code(job[0], job[1], limits, scoring), zip(programs, suites))
            )

    return named(code_reward, "code", make_code_reward.__doc__)
