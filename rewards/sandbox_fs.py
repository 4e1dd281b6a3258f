"""The filesystem a sandboxed code run sees, and which tool builds it on this machine.

A run sees only: its empty working directory ``/sandbox/work`` (writable), the sandbox program
``/sandbox/child.py``, ``/usr`` and the ``/lib*`` and ``/bin`` links of the system (read-only, for the C library),
the Python install (``sys.prefix``, ``sys.base_prefix``, the standard library and site-packages,
read-only, at their own paths, even under ``/root``), ``/proc`` of its own pid namespace, ``/dev/null``
and ``/dev/urandom``. No home directory, no project checkout, no host ``/tmp``, nothing else of ``/etc``.

Modes, best first (``sandbox_mode()``, checked once per process):

- ``bwrap``: bubblewrap builds the view (as root, or unprivileged in a user namespace);
- ``unshare``: root only, without bubblewrap: ``unshare --mount --pid --net`` and ``sandbox_mount.py``
  bind the same paths into a tmpfs and chroot there;
- ``none``: neither works; the run reads whatever its uid may read (warned once).

``REWARDS_SANDBOX`` picks: ``auto`` (default: the best mode), ``strict`` (the best mode, and refuse to run
in ``none``), or one mode by name (for tests and debugging).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from rewards.base import logger

MODES = ("bwrap", "unshare", "none")
SETTINGS = ("auto", "strict", *MODES)
ENV = "REWARDS_SANDBOX"
SANDBOX_DIR = "/sandbox"
WORK_DIR = "/sandbox/work"
CHILD_PATH = "/sandbox/child.py"
DEVICES = ("/dev/null", "/dev/urandom")
SYSTEM_DIRS = ("/usr",)
SYSTEM_LINKS = ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin")
"""Bound (or re-created as symlinks, on merged-/usr systems) so the dynamic loader and libc are found."""
SYSTEM_FILES = ("/etc/ld.so.cache",)
MOUNT_SCRIPT = Path(__file__).with_name("sandbox_mount.py")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"


class SandboxUnavailable(ValueError):
    """Strict containment was required but this machine cannot provide it (a setting it cannot honour)."""


def python_roots() -> list[str]:
    """The Python install's directories a run needs (read-only), outermost only, at their given paths.

    A virtual environment's prefix and its base interpreter's are both here; the directory of the
    resolved executable too (a venv's ``python`` is a symlink into the base install).
    """
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    config = sysconfig.get_paths()
    paths |= {config[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    chosen: list[str] = []
    for path in sorted((os.path.abspath(p) for p in paths if p and os.path.isdir(p)), key=len):
        covered = [*chosen, *SYSTEM_DIRS]
        if path != "/" and not any(path == c or path.startswith(c + "/") for c in covered):
            chosen.append(path)
    return chosen


def filesystem_view(work: str, child_script: str) -> dict[str, list]:
    """Describe a run's view: ``binds`` (host path, sandbox path, writable), ``links`` (path, target), ``dirs``.

    ``dirs`` are the parent directories to create (mode 0755, so a dropped uid can pass through a
    ``/root`` that is 0700 on the host).
    """
    binds: list[tuple[str, str, bool]] = []
    links: list[tuple[str, str]] = []
    for path in SYSTEM_DIRS:
        binds.append((path, path, False))
    for path in SYSTEM_LINKS:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append((path, path, False))
    binds += [(p, p, False) for p in SYSTEM_FILES if os.path.isfile(p)]
    binds += [(os.path.realpath(p), p, False) for p in python_roots()]
    binds += [(d, d, True) for d in DEVICES]
    binds += [(child_script, CHILD_PATH, False), (work, WORK_DIR, True)]
    dirs: set[str] = set()
    for _, dst, _ in binds:
        dirs |= {str(p) for p in Path(dst).parents if str(p) != "/"}
    return {"binds": binds, "links": links, "dirs": sorted(dirs, key=len)}


def visible_roots(view: dict[str, list] | None = None) -> list[str]:
    """What a run can see, as sandbox paths: ``rw`` or ``ro`` bind mounts and ``/proc``."""
    view = view or filesystem_view("WORK", "CHILD")
    roots = [f"{dst} ({'rw' if writable else 'ro'})" for _, dst, writable in view["binds"]]
    return sorted(roots + [f"{link} -> {target}" for link, target in view["links"]] + ["/proc (own pid namespace)"])


def bwrap_command(work: str, child_script: str, argv: list[str]) -> list[str]:
    """The bubblewrap command that runs ``argv`` in the view (root stays root inside: the child drops it)."""
    view = filesystem_view(work, child_script)
    command = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net"]
    command += ["--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--clearenv"]
    # The run is the namespace's init, a direct child of bwrap, which reaps it: with bwrap's own init
    # in between, bwrap exits before that init does, leaving a zombie wherever orphans go.
    command.append("--as-pid-1")
    if os.geteuid() != 0:
        command.append("--unshare-user")
    for d in view["dirs"]:
        command += ["--perms", "0755", "--dir", d]
    for link, target in view["links"]:
        command += ["--symlink", target, link]
    for src, dst, writable in view["binds"]:
        kind = "--dev-bind" if dst in DEVICES else "--bind" if writable else "--ro-bind"
        command += [kind, src, dst]
    command += ["--proc", "/proc", "--chdir", WORK_DIR, "--", *argv]
    return command


def unshare_command(work: str, child_script: str, argv: list[str], staging: str) -> list[str]:
    """The root-only fallback: new mount, pid, net, ipc and uts namespaces; ``sandbox_mount.py`` builds the view."""
    import json

    view = filesystem_view(work, child_script)
    spec = json.dumps({"root": staging, "cwd": WORK_DIR, **view})
    unshare = shutil.which("unshare") or "unshare"
    return [
        unshare, "--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts",
        "--propagation", "private", "--",
        sys.executable, "-I", "-S", "-B", str(MOUNT_SCRIPT), spec, "--", *argv,
    ]  # fmt: skip


def build_command(mode: str, work: str, child_script: str, argv: list[str], staging: str) -> list[str]:
    """The command that runs ``argv`` (which names the child as ``CHILD_PATH``) in ``mode``'s view.

    ``staging`` is an empty host directory the ``unshare`` mode mounts its tmpfs on.
    """
    if mode == "bwrap":
        return bwrap_command(work, child_script, argv)
    if mode == "unshare":
        return unshare_command(work, child_script, argv, staging)
    raise ValueError(f"no filesystem view in mode {mode!r}; modes with one: bwrap, unshare")


_lock = threading.Lock()
_checked: dict[str, tuple[bool, str]] = {}
_warned: list[bool] = []


def _probe(mode: str) -> tuple[bool, str]:
    """Run ``import json`` in ``mode``'s view, as the dropped uid would; return (works, why not)."""
    if mode == "bwrap" and not shutil.which("bwrap"):
        return False, "bwrap is not installed"
    if mode == "unshare" and (os.geteuid() != 0 or not shutil.which("unshare")):
        return False, "unshare --mount needs root and util-linux's unshare"
    base = Path(tempfile.mkdtemp(prefix="rewards-sandbox-check-"))
    try:
        (base / "work").mkdir()
        (base / "staging").mkdir()
        check = base / "check.py"
        # As root, the child drops to another uid before importing: check that the Python install is readable then.
        check.write_text("import os\nif os.geteuid() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\nimport json\n")
        argv = [sys.executable, "-I", "-S", "-B", CHILD_PATH]
        command = build_command(mode, str(base / "work"), str(check), argv, str(base / "staging"))
        done = subprocess.run(command, capture_output=True, timeout=30, env={}, check=False)
        if done.returncode == 0:
            return True, ""
        return False, f"{Path(command[0]).name} failed (exit code {done.returncode}): {done.stderr.decode()[-500:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{mode} failed: {e}"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def available(mode: str) -> tuple[bool, str]:
    """Whether ``mode`` works here (checked once per process), and why not."""
    with _lock:
        if mode not in _checked:
            _checked[mode] = (True, "") if mode == "none" else _probe(mode)
        return _checked[mode]


def setting() -> str:
    """The ``REWARDS_SANDBOX`` setting (default ``auto``)."""
    value = os.environ.get(ENV, "").strip() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV}={value!r} is not allowed; allowed: {', '.join(SETTINGS)}")
    return value


def why_not_contained() -> str:
    """Why neither contained mode works here (for warnings and errors)."""
    return "; ".join(f"{m}: {available(m)[1]}" for m in ("bwrap", "unshare"))


def _why_none() -> str:
    return f"forced by {ENV}=none" if setting() == "none" else why_not_contained()


def require_strict(key: str) -> str:
    """Return the contained mode this machine gives; raise :class:`SandboxUnavailable` naming ``key`` if none."""
    for mode in ("bwrap", "unshare"):
        if available(mode)[0]:
            return mode
    raise SandboxUnavailable(
        f"{key}: strict needs a sandbox that hides the filesystem, and none works here ({why_not_contained()}); "
        f"{INSTALL_HINT}, or run as root (unshare --mount), or set {key} to auto to run uncontained"
    )


def sandbox_mode() -> str:
    """The mode runs use now (see the module docstring); warns once when it is ``none``.

    Raises:
        SandboxUnavailable: ``REWARDS_SANDBOX=strict`` (or a named mode) and this machine cannot provide it.
    """
    wanted = setting()
    if wanted == "strict":
        return require_strict(ENV)
    if wanted in ("bwrap", "unshare"):
        ok, why = available(wanted)
        if not ok:
            raise SandboxUnavailable(f"{ENV}={wanted}: that mode does not work here ({why})")
        return wanted
    mode = "none"
    if wanted == "auto":
        mode = next((m for m in ("bwrap", "unshare") if available(m)[0]), "none")
    if mode == "none" and not _warned:
        _warned.append(True)
        logger.warning(
            "code sandbox: no filesystem isolation (%s). Sandboxed code can READ every file its uid can "
            "(as root with setpriv: every file on this machine), e.g. ~/.netrc, ~/.ssh, tokens, the project; "
            "it still cannot write outside its working directory, use the network, start processes or "
            "exceed its limits. To contain reads, %s; to refuse running without it set %s=strict "
            "(a recipe: reward_sandbox: strict).",
            _why_none(),
            INSTALL_HINT,
            ENV,
        )
    return mode


def describe() -> str:
    """One line for ``grpo check-rewards``: the mode, and what a run can read in it."""
    mode = sandbox_mode()
    if mode == "none":
        return (
            f"code sandbox: none: NOT contained, the code can read every file its uid can ({_why_none()}); "
            f"{INSTALL_HINT} to hide the filesystem"
        )
    return f"code sandbox: {mode}: the code sees only {', '.join(visible_roots())}"
