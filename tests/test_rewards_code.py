"""Code reward: completions' code runs against tests in a sandbox that contains what it must.

Every adversarial program here is bounded even if a protection failed: the fork loop forks at most
6 times (64 processes), the 10 GB allocation runs only after the memory limit is seen in force, and
every run has a short wall-clock limit after which its process group is killed.
"""

import os
import time

import pytest

import rewards
from rewards.code import (
    SandboxLimits,
    extract_code,
    parse_tests,
    privilege_mode,
    run_assert_tests,
    run_program,
    sandbox_report,
)

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=3.0)


def _fenced(code):
    return f"<think>I will write it.</think>\n```python\n{code}\n```"


def _score(code, tests, **options):
    reward = rewards.get("code", cpu_seconds=1, wall_seconds=3.0, **options)
    return reward(prompts=["q"], completions=[_fenced(code)], test_cases=[tests])[0]


def _expects(output):
    return [{"input": "", "output": output}]


def test_correct_solutions_pass_stdio_and_assert_tests():
    assert (
        _score(
            "print(int(input()) * 2)", [{"input": "3\n", "output": "6"}, {"input": "10\n", "output": "20\n"}]
        )
        == 1.0
    )
    assert (
        _score("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]) == 1.0
    )


def test_partial_solutions_get_the_share_of_tests_passed_or_zero_when_all_are_required():
    tests = ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(0) == 0", "assert sq(1) == 1"]
    assert _score("def sq(x):\n    return x * 2", tests) == 0.5
    assert _score("def sq(x):\n    return x * 2", tests, scoring="all") == 0.0


def test_a_solution_cannot_fake_passing_asserts_by_exiting_early():
    tests = ["assert f(2) == 5", "assert f(3) == 7"]
    for cheat in [
        "import os\nos._exit(0)",
        "import sys\nsys.exit(0)",
        "def f(x):\n    return None\nprint('0\\tpass\\tx')",
    ]:
        assert _score(cheat, tests) == 0.0


def test_non_literal_asserts_run_in_the_sandbox():
    assert _score("def f(x):\n    return [x, x]", ["assert len(f(3)) == 2 and f(3)[0] == 3"]) == 1.0
    assert run_assert_tests("def f(x):\n    return x", ["assert f(1) > 5"], FAST) == [False]
    patches_exec = "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef f(x):\n    return x"
    assert run_assert_tests(patches_exec, ["assert f(1) > 5", "assert f(2) == 3"], FAST) == [False, False]


def test_code_that_loops_forever_is_stopped_by_the_time_limits():
    start = time.monotonic()
    assert _score("while True:\n    pass", _expects("never")) == 0.0
    assert _score("import time\ntime.sleep(60)", _expects("never")) == 0.0
    assert time.monotonic() - start < 10


def test_code_that_forks_is_refused_and_its_process_group_is_gone():
    bomb = "import os, time\nfor _ in range(6):\n    os.fork()\nprint('forked')\ntime.sleep(30)"
    result = run_program(bomb, "", FAST)
    assert "sandbox: os.fork" in result.stderr
    assert "forked" not in result.stdout
    with pytest.raises(ProcessLookupError):
        os.killpg(result.pid, 0)
    assert _score(bomb, _expects("forked")) == 0.0
    assert _score("import subprocess\nsubprocess.run(['true'])\nprint('ran')", _expects("ran")) == 0.0
    assert _score("import os\nos.system('true')\nprint('ran')", _expects("ran")) == 0.0


def test_code_that_allocates_10_gb_is_stopped_by_the_memory_limit():
    limit = sandbox_report(FAST)["limits"]["RLIMIT_AS"][0]
    assert 0 < limit <= 2 << 30, "the memory limit must be in force before the 10 GB test runs"
    result = run_program("x = bytearray(10 * 1024**3)\nprint('allocated')", "", FAST)
    assert "MemoryError" in result.stderr
    assert _score("x = bytearray(10 * 1024**3)\nprint('allocated')", _expects("allocated")) == 0.0


def test_code_that_writes_outside_its_directory_is_refused(tmp_path):
    target_dir = tmp_path / "shared"
    target_dir.mkdir()
    target_dir.chmod(0o777)  # writable by anyone: only the sandbox's rules stand in the way
    target = target_dir / "pwned.txt"
    program = f"open({str(target)!r}, 'w').write('x')\nprint('wrote')"
    assert _score(program, _expects("wrote")) == 0.0
    patched = (
        "import builtins, __main__\nbuiltins.any = lambda *a: False\n__main__.WRITE_FLAGS = 0\n" + program
    )
    assert _score(patched, _expects("wrote")) == 0.0
    assert not target.exists()
    assert _score("import os\nos.mkdir('../escape')\nprint('made')", _expects("made")) == 0.0
    inside = "open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())"
    assert _score(inside, _expects("ok")) == 1.0


def test_code_that_opens_a_socket_is_refused():
    program = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\nprint('socket')"
    assert _score(program, _expects("socket")) == 0.0
    result = run_program(program, "", FAST)
    assert "sandbox: socket" in result.stderr


def test_code_cannot_read_the_parents_environment(monkeypatch):
    monkeypatch.setenv("REWARDS_TEST_SECRET", "hunter2")
    assert _score("import os\nprint(os.environ.get('REWARDS_TEST_SECRET'))", _expects("hunter2")) == 0.0
    peek = "import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read().count(b'hunter2'))"
    assert _score(peek, _expects("1")) == 0.0


def test_sandbox_runs_unprivileged_with_limits_an_empty_directory_and_environment():
    report = sandbox_report(FAST)
    assert report["limits"]["RLIMIT_CPU"][0] == 1
    assert report["limits"]["RLIMIT_NPROC"][0] == FAST.processes
    assert report["limits"]["RLIMIT_FSIZE"][0] == FAST.file_bytes
    assert set(report["env"]) <= {"LC_CTYPE"}  # Python's own C-locale coercion, nothing inherited
    assert os.path.basename(report["cwd"]) == "work"
    if os.geteuid() == 0:
        if privilege_mode() == "none":
            pytest.skip("root cannot drop to another uid on this machine (see rewards.code.privilege_mode)")
        assert report["uid"] != 0 and report["euid"] != 0
    listing = run_program("import os\nprint(os.listdir('.'))", "", FAST)
    assert listing.stdout.strip() == "[]"


def test_process_count_limit_stops_a_thread_swarm():
    swarm = "import threading, time\nfor _ in range(64):\n    threading.Thread(target=time.sleep, args=(2,)).start()\nprint('64')"
    result = run_program(swarm, "", FAST)
    assert "can't start new thread" in result.stderr
    assert result.stdout == ""


def test_runaway_output_is_capped_by_the_file_size_limit():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "", FAST)
    assert result.returncode != 0
    assert len(result.stdout) <= FAST.output_bytes


def test_extract_code_takes_the_last_python_block_after_the_reasoning():
    text = "<think>```python\nprint(1)\n```</think>\nFirst:\n```python\nprint(2)\n```\nBetter:\n```py\nprint(3)\n```\n```text\nout\n```"
    assert extract_code(text) == "print(3)"
    assert extract_code("no code here") is None
    assert _score("", _expects("")) == 0.0


def test_test_formats_are_recognised_and_bad_ones_named():
    assert parse_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}').kind == "stdio"
    assert parse_tests({"test_cases": [{"input": "1", "output": "2"}]}).kind == "stdio"
    assert parse_tests(["assert f() == 1"]).kind == "assert"
    with pytest.raises(ValueError, match="accepted: a list of assert statements"):
        parse_tests(42)
