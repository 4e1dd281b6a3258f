"""The code sandbox's filesystem view: secrets outside it stay unreadable, the standard library still runs.

Each leak test scores a completion that prints a secret file's content against a stdio test expecting
that content: it would score 1.0 if the read worked. The tests run in every contained mode this
machine has (``bwrap``, and ``unshare`` as root), and once more as a fresh non-root uid when run as root.
With ``REWARDS_SANDBOX=strict`` (what CI sets) no test may fall back to an uncontained run.
"""

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rewards
from grpo.config import RecipeError, load_recipe
from rewards import sandbox_fs
from rewards.code import SandboxLimits, run_program, sandbox_report
from rewards.sandbox_fs import SandboxUnavailable, describe, require_strict, sandbox_mode

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3.0)
CONTAINED = [m for m in ("bwrap", "unshare") if sandbox_fs.available(m)[0]]


def _score(code, output, stdin=""):
    reward = rewards.get("code", cpu_seconds=1, wall_seconds=3.0)
    completion = f"<think>read it</think>\n```python\n{code}\n```"
    return reward(prompts=["q"], completions=[completion], test_cases=[[{"input": stdin, "output": output}]])[0]


def _reads(path):
    return f"print(open({str(path)!r}).read())"


@pytest.fixture(params=CONTAINED or [None])
def mode(request, monkeypatch):
    """Run the test in one contained mode (skipped where none works: see sandbox_fs.why_not_contained)."""
    if request.param is None:
        pytest.skip(f"no contained sandbox mode here ({sandbox_fs.why_not_contained()})")
    monkeypatch.setenv(sandbox_fs.ENV, request.param)
    return request.param


@pytest.fixture
def secret_files(tmp_path):
    """A root-only file (as root), a file in the user's home, a world-readable file in /tmp: path -> secret."""
    made = {}

    def make(path, mode):
        secret = secrets.token_hex(8)
        path.write_text(secret)
        path.chmod(mode)
        made[path] = secret

    make(Path.home() / f".rewards-sandbox-test-{secrets.token_hex(4)}", 0o600)
    make(tmp_path / "world-readable", 0o644)
    tmp_path.chmod(0o755)
    if os.geteuid() == 0:
        root_only = tmp_path / "root-only"
        make(root_only, 0o600)
    try:
        yield made
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_secret_files_outside_the_view_are_unreadable(mode, secret_files):
    for path, secret in secret_files.items():
        assert _score(_reads(path), secret) == 0.0, f"{mode}: read {path}"
    project_file = ROOT / "pyproject.toml"
    first_line = project_file.read_text().splitlines()[0]
    assert _score(f"print(open({str(project_file)!r}).readline())", first_line) == 0.0
    listing = run_program("import os\nprint(os.listdir('/'))\nprint(os.path.exists('/tmp'))", "", FAST)
    assert "tmp" not in listing.stdout.splitlines()[0] and "work" not in listing.stdout.splitlines()[0]
    assert listing.stdout.splitlines()[1] == "False"


def test_the_leak_tests_would_see_a_leak(secret_files, monkeypatch, caplog):
    """Without a view (mode none) the same completions read the /tmp and project files: the tests above mean something."""
    monkeypatch.setenv(sandbox_fs.ENV, "none")
    with caplog.at_level(logging.WARNING, logger="rewards"):
        monkeypatch.setattr(sandbox_fs, "_warned", [])
        tmp_file = next(p for p in secret_files if p.name == "world-readable")
        assert _score(_reads(tmp_file), secret_files[tmp_file]) == 1.0
        assert _score(_reads(ROOT / "pyproject.toml"), (ROOT / "pyproject.toml").read_text()) == 1.0
    assert "can READ every file" in caplog.text and "install bubblewrap" in caplog.text


def test_the_run_holds_no_capability_that_reads_past_file_permissions(mode):
    status = run_program("print(open('/proc/self/status').read())", "", FAST).stdout
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0 and int(caps["CapAmb"], 16) == 0


def test_standard_library_solutions_still_run(mode):
    solution = (
        "import json, math, collections, re, itertools, heapq, fractions, decimal, functools, bisect, string\n"
        "import random, statistics, datetime, array, dataclasses, typing, operator, copy, textwrap\n"
        "n = int(input())\n"
        "h = list(range(n, 0, -1)); heapq.heapify(h)\n"
        "print(json.dumps({'sum': sum(itertools.accumulate(range(n)))}), math.comb(n, 2), heapq.heappop(h),"
        " fractions.Fraction(1, n) * 2, collections.Counter('abca')['a'], re.sub('a', 'b', 'aa'))\n"
    )
    assert _score(solution, '{"sum": 10} 6 1 1/2 2 bb', stdin="4\n") == 1.0
    assert _score("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", "ok") == 1.0


def test_report_lists_the_mode_and_what_is_visible(mode):
    report = sandbox_report(FAST)
    assert report["mode"] == mode
    assert "/sandbox/work (rw)" in report["visible"] and "/usr (ro)" in report["visible"]
    assert not any(v.startswith(("/home", "/tmp", str(ROOT))) for v in report["visible"])
    assert set(report["root_entries"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc",
                                           "root", "home", "opt", "sandbox", "sbin", "usr"}
    assert set(report["env"]) <= {"LC_CTYPE"}
    assert describe().startswith(f"code sandbox: {mode}: the code sees only ") and "/sandbox/work (rw)" in describe()
    if os.geteuid() == 0:
        assert report["uid"] != 0 and report["privileges"] == "setuid"


def test_what_held_before_still_holds(mode):
    # /proc/1/environ, the parent's environ, killing the parent.
    assert _score("print(open('/proc/1/environ', 'rb').read())", "b''") == 0.0
    assert _score("import os\nos.kill(os.getppid(), 9)\nprint('killed')", "killed") == 0.0
    # A SIGTERM-immune busy loop is stopped by the time limits.
    start = time.monotonic()
    immune = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass"
    assert _score(immune, "never") == 0.0
    assert time.monotonic() - start < 8
    # A real segfault (C stack overflow) scores 0.
    crash = "import sys\nsys.setrecursionlimit(10**8)\nclass A:\n    def __repr__(self):\n        return repr(self)\n"
    assert run_program(crash + "repr(A())", "", FAST).returncode in (139, -signal.SIGSEGV)
    assert _score(crash + "repr(A())\nprint('alive')", "alive") == 0.0
    # Files one sample writes to shared places are not seen by the next.
    for place in ("/dev/shm", "/tmp", "/var/tmp"):
        run_program(f"open('{place}/note', 'w').write('left')", "", FAST)
        assert _score(f"print(open('{place}/note').read())", "left") == 0.0
    # A setsid double-forked daemon does not survive the run.
    daemon = "import os, time\nos.setsid()\nif os.fork() == 0:\n    if os.fork() == 0:\n        time.sleep(30)\nprint('forked')"
    assert _score(daemon, "forked") == 0.0


def test_a_bad_sandbox_setting_is_named(monkeypatch):
    monkeypatch.setenv(sandbox_fs.ENV, "maybe")
    with pytest.raises(ValueError, match="REWARDS_SANDBOX='maybe' is not allowed; allowed: auto, strict"):
        run_program("print(1)", "", FAST)


def test_strict_refuses_to_run_uncontained_and_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sandbox_fs._checked, "bwrap", (False, "bwrap is not installed"))
    monkeypatch.setitem(sandbox_fs._checked, "unshare", (False, "unshare --mount needs root"))
    monkeypatch.setenv(sandbox_fs.ENV, "strict")
    with pytest.raises(SandboxUnavailable, match="REWARDS_SANDBOX: strict needs .* install bubblewrap"):
        run_program("print(1)", "", FAST)
    with pytest.raises(SandboxUnavailable, match="reward_sandbox: strict needs"):
        require_strict("reward_sandbox")
    with pytest.raises(SandboxUnavailable, match="code reward option sandbox: strict"):
        rewards.get("code", sandbox="strict")


def test_check_rewards_refuses_a_strict_recipe_where_the_sandbox_is_uncontained(monkeypatch, capsys):
    from grpo.cli import main

    monkeypatch.setitem(sandbox_fs._checked, "bwrap", (False, "bwrap is not installed"))
    monkeypatch.setitem(sandbox_fs._checked, "unshare", (False, "unshare --mount needs root"))
    recipe = ROOT / "recipes" / "ci_tiny.yaml"
    assert main(["check-rewards", str(recipe), "reward_sandbox=strict", "--n", "2"]) == 2
    assert "reward_sandbox: strict needs a sandbox that hides the filesystem" in capsys.readouterr().err


def test_recipes_require_strict_with_reward_sandbox(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: tiny}\nreward_sandbox: strict\n")
    assert load_recipe(recipe).reward_sandbox == "strict"
    recipe.write_text("model: {preset: tiny}\nreward_sandbox: maybe\n")
    with pytest.raises(RecipeError, match="reward_sandbox: 'maybe' is not allowed; allowed: 'auto', 'strict'"):
        load_recipe(recipe)


def test_ci_runs_the_sandbox_contained():
    if os.environ.get(sandbox_fs.ENV) != "strict":
        pytest.skip("REWARDS_SANDBOX is not strict here (CI sets it after installing bubblewrap)")
    assert sandbox_mode() in ("bwrap", "unshare")
    assert sandbox_report(FAST)["mode"] in ("bwrap", "unshare")


NON_ROOT_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import rewards
from rewards.code import run_program, sandbox_report
secrets = json.loads(sys.argv[2])
reward = rewards.get("code", cpu_seconds=1, wall_seconds=3.0)
def score(code, output):
    completion = "```python\\n" + code + "\\n```"
    return reward(prompts=["q"], completions=[completion], test_cases=[[{"input": "", "output": output}]])[0]
report = sandbox_report()
scores = {path: score(f"print(open({path!r}).read())", secret) for path, secret in secrets.items()}
status = run_program("print(open('/proc/self/status').read())").stdout
caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines() if line.startswith("Cap")}
print(json.dumps({"mode": report["mode"], "uid": report["uid"], "scores": scores, "caps": caps,
                  "stdlib": score("import json, fractions, heapq\\nprint(fractions.Fraction(2, 4))", "1/2")}))
"""


def _hidden_ancestor(path):
    """The outermost directory above ``path`` that other users cannot enter (``/root``), or None."""
    for parent in reversed(Path(path).parents):
        if str(parent) != "/" and not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def test_the_same_holds_as_a_non_root_user(tmp_path, secret_files):
    if os.geteuid() != 0:
        pytest.skip("already not root: the tests above ran as this user")
    if not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("running as root without setpriv and unshare: cannot start the tests as a fresh uid")
    if sys.prefix != sys.base_prefix:
        pytest.skip("a virtual environment: this test makes only a plain Python install readable to another uid")
    uid = 60000 + secrets.randbelow(900)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine example.com password hunter2\n")
    (home / ".netrc").chmod(0o600)
    os.chown(home, uid, uid)
    os.chown(home / ".netrc", uid, uid)
    tmp_path.chmod(0o755)
    wanted = {str(p): s for p, s in secret_files.items()}
    wanted[str(home / ".netrc")] = "machine example.com password hunter2"
    wanted[str(ROOT / "pyproject.toml")] = (ROOT / "pyproject.toml").read_text()
    driver = [sys.executable, "-I", "-c", NON_ROOT_DRIVER, str(ROOT), json.dumps(wanted)]
    become = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    # A non-root user can read the Python it runs. Where this one lies under a directory closed to others
    # (/root/.pyenv), the driver gets a private mount namespace in which only the install is reachable there.
    hidden = _hidden_ancestor(sys.base_prefix)
    if hidden is None:
        command = [*become, *driver]
    else:
        stage = tmp_path / "stage"
        stage.mkdir()
        script = (
            f'mount --bind "{sys.base_prefix}" "{stage}" && mount -t tmpfs -o mode=0755 tmpfs "{hidden}" && '
            f'mkdir -p "{sys.base_prefix}" && mount --move "{stage}" "{sys.base_prefix}" && exec "$@"'
        )
        command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *become, *driver]
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if os.environ.get(sandbox_fs.ENV):
        env[sandbox_fs.ENV] = os.environ[sandbox_fs.ENV]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["mode"] == "none":
        pytest.skip(f"no contained mode for a non-root user here (user namespaces off?): {done.stderr[-500:]}")
    assert result["uid"] == uid
    assert result["scores"] == {path: 0.0 for path in wanted}
    assert result["caps"]["CapEff"] == 0 and result["caps"]["CapPrm"] == 0
    assert result["stdlib"] == 1.0
    assert _processes_of(uid) == []


def _processes_of(uid):
    found = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found
