"""The program the code sandbox runs in its child process, before and around the untrusted solution.

It reads its job from an inherited descriptor (then closes it), lowers its resource limits, drops root to the job's
unprivileged uid, installs an audit hook that refuses new processes, sockets, native-code loading and
writes outside the working directory, and only then runs the solution. It is run as a script
(``python -I -S sandbox_child.py JOB_FD RESULT_FD``) and imports nothing from the ``rewards`` package.
"""

import builtins
import contextlib
import json
import os
import resource
import signal
import sys
import traceback

REFUSED_EVENT_PREFIXES = (
    "os.exec",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.system",
    "os.startfile",
    "subprocess.",
    "pty.",
    "socket.",
    "ctypes.",
    "resource.setrlimit",
    "resource.prlimit",
    "winreg.",
    "_winapi.",
)
REFUSED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "_cffi_backend", "cffi", "_imp"})
# Events whose arguments name paths that get modified: (indices of path arguments, index of dir_fd arguments).
MODIFYING_EVENTS = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),
    "os.link": ((0, 1), (2, 3)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
FALLBACK_UID = 65534  # nobody


def apply_limits(limits):
    """Lower this process's resource limits (they hold for every process it could start)."""
    cpu = int(limits["cpu_seconds"])
    settings = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_NPROC, (limits["processes"],) * 2),
    ]
    for which, value in settings:
        try:
            resource.setrlimit(which, value)
        except (ValueError, OSError):
            pass


def drop_privileges(uid):
    """As root, become ``uid`` (or nobody if that fails), so RLIMIT_NPROC and file permissions apply."""
    if os.geteuid() != 0:
        return
    for target in (uid, FALLBACK_UID):
        if target is None:
            continue
        try:
            os.setgroups([])
            os.setgid(target)
            os.setuid(target)
            return
        except OSError:
            continue


def make_audit_hook(root):
    """Return the audit hook that enforces the sandbox's rules for a working directory ``root``.

    Everything the hook uses is bound here, so a solution that patches builtins or this module's
    globals does not change its rules (it could still patch ``os.path`` internals: the uid, the
    limits and the network namespace are the wall behind this hook).
    """
    realpath, isdir, fspath, devnull, sep = os.path.realpath, os.path.isdir, os.fspath, os.devnull, os.sep
    own_pid = os.getpid()
    refused_prefixes, refused_imports = REFUSED_EVENT_PREFIXES, REFUSED_IMPORTS
    modifying, write_flags = dict(MODIFYING_EVENTS), WRITE_FLAGS
    kill_events = ("os.kill", "os.killpg", "signal.pthread_kill")
    any_, bool_, str_, bytes_, int_, tuple_, len_ = any, bool, str, bytes, int, tuple, len
    isinstance_, error = isinstance, PermissionError

    def refuse(what):
        raise error(f"sandbox: {what} is not allowed")

    def inside(path):
        return path == root or path.startswith(root + sep)

    def resolve(path):
        path = fspath(path)
        if isinstance_(path, bytes_):
            path = path.decode("utf-8", "surrogateescape")
        return realpath(path)

    def hook(event, args):
        # No re-entrancy guard: nothing below raises audit events, and a guard shared between
        # threads would let one thread's events slip through while another is being checked.
        if event.startswith(refused_prefixes):
            refuse(f"{event} (new processes, network, native code and limit changes are refused)")
        elif event == "import" and args and args[0] in refused_imports:
            refuse(f"importing {args[0]}")
        elif event in kill_events and args and args[0] != own_pid:
            refuse(f"{event} of another process")
        elif event == "open":
            path, mode, flags = (tuple_(args) + (None, None, None))[:3]
            if path is None or isinstance_(path, int_):
                return
            target = resolve(path)
            if target == devnull:
                return
            writes = bool_(mode and any_(c in str_(mode) for c in "wax+")) or bool_(
                (flags or 0) & write_flags
            )
            if isdir(target):
                refuse(f"opening the directory {target}")
            if writes and not inside(target):
                refuse(f"writing {target} (only the working directory {root} is writable)")
            if target.startswith("/proc/") and target.endswith(("/environ", "/mem")):
                refuse(f"reading {target}")
        elif event in modifying:
            path_indices, fd_indices = modifying[event]
            for i in fd_indices:
                if i < len_(args) and args[i] not in (None, -1):
                    refuse(f"{event} relative to a directory descriptor")
            for i in path_indices:
                if i < len_(args) and not isinstance_(args[i], int_) and not inside(resolve(args[i])):
                    refuse(f"{event} on {args[i]!r} outside the working directory {root}")

    return hook


def probe(job, result_fd, net_before):
    """Report the sandbox's state (uid, limits, network namespace, what ``/`` holds) as one JSON line."""
    names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE")
    report = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "limits": {n: list(resource.getrlimit(getattr(resource, n))) for n in names},
        "net_namespace": net_before,
        "audit_hook": True,
        "root_entries": sorted(os.listdir("/")),
    }
    os.write(result_fd, (json.dumps(report) + "\n").encode())


def run_program(code):
    """Run ``code`` as ``__main__`` with the job's stdin; exit 0 on success, 1 on an error."""
    status = 0
    try:
        exec(compile(code, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
    os._exit(status)


def _on_cpu_limit(signum, frame):
    os._exit(128 + signum)


def _on_alarm(signum, frame):
    raise TimeoutError("test timed out")


def _plain(value):
    """Turn array-like results (numpy) into plain Python values before ``repr``."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) and not isinstance(value, (list, tuple, dict, str, bytes)) else value


def run_tests(code, tests, nonce, result_fd, test_seconds, max_repr):
    """Define the solution, then run each test, writing one result line per test to ``result_fd``.

    A ``value`` test evaluates an expression and reports its ``repr``: the parent compares it with
    the expected value, which this process never sees. An ``assert`` test runs a statement and reports
    pass or fail, tagged with the job's nonce.
    """
    run, evaluate, compile_, write, show = (
        exec,
        eval,
        compile,
        os.write,
        repr,
    )  # the solution may patch builtins
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    signal.signal(signal.SIGALRM, _on_alarm)
    for i, test in enumerate(tests):
        line = f"{i}\tfail\t{nonce}"
        try:
            signal.setitimer(signal.ITIMER_REAL, test_seconds)
            if test["kind"] == "value":
                shown = show(_plain(evaluate(compile_(test["expr"], f"test_{i}", "eval"), namespace)))
                if len(shown) <= max_repr:
                    line = f"{i}\tvalue\t{json.dumps(shown)}"
            else:
                run(compile_(test["code"], f"test_{i}", "exec"), namespace)
                line = f"{i}\tpass\t{nonce}"
        except BaseException:
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        write(result_fd, (line + "\n").encode())
    os._exit(0)


def main():
    """Set the sandbox up, then run the job (``program``, ``tests`` or ``probe``)."""
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
    try:
        net_namespace = os.readlink("/proc/self/ns/net")
    except OSError:
        net_namespace = None
    sys.path.extend(p for p in job.get("site_paths", ()) if p not in sys.path)  # run with -S: no .pth files
    os.environ.pop("PWD", None)  # bubblewrap always sets it; the run's environment stays empty
    # Under bubblewrap this process is its pid namespace's init, for which SIGXCPU's default action
    # (terminate) does not apply: end at the soft CPU limit here (the hard limit's SIGKILL still does).
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    apply_limits(job["limits"])
    drop_privileges(job.get("uid"))
    root = os.path.realpath(os.getcwd())
    sys.addaudithook(make_audit_hook(root))
    if job["mode"] == "probe":
        probe(job, result_fd, net_namespace)
    elif job["mode"] == "program":
        run_program(job["code"])
    else:
        run_tests(job["code"], job["tests"], job["nonce"], result_fd, job["test_seconds"], job["max_repr"])


if __name__ == "__main__":
    main()
