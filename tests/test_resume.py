"""Crash safety: a run killed with SIGKILL at any moment and restarted with `--resume` ends with the weights of
an uninterrupted run, and logs every step exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo.checkpointing import cut_log
from grpo.cli import main
from model import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
# Checkpoints at steps 2, 4 and 5; a kill between them redoes the steps since the last one.
ARGS = [str(ROOT / "recipes" / "ci_tiny.yaml"), f"max_steps={STEPS}", "logging.save_every=2",
        "prompts_per_step=2", "sampling.max_completion_length=8", "logging.progress_bar=false"]


def start(out: Path, *extra: str, kill_in_save: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GRPO_TEST_KILL_IN_SAVE", None)
    if kill_in_save is not None:
        env["GRPO_TEST_KILL_IN_SAVE"] = str(kill_in_save)  # see grpo/checkpointing.py: save_checkpoint
    return subprocess.Popen([sys.executable, "-m", "grpo.cli", "train", *ARGS, f"output_dir={out}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout + stderr


def logged_steps(path: Path) -> list[int]:
    text = path.read_text() if path.exists() else ""
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line"
    return [json.loads(line)["step"] for line in text.splitlines()]


@pytest.mark.slow
def test_a_run_killed_at_any_moment_resumes_bit_exact_and_logs_each_step_once(tmp_path):
    rc, log = finish(start(tmp_path / "straight"))
    assert rc == 0, log
    out = tmp_path / "killed"

    # 1. Killed while writing its first checkpoint: steps 1 and 2 are logged, no checkpoint is complete.
    rc, log = finish(start(out, kill_in_save=2))
    assert rc == -signal.SIGKILL, log
    assert (out / "checkpoints" / ".tmp-step-000002").exists() and logged_steps(out / "metrics.jsonl") == [1, 2]

    # 2. Killed at start-up, during the imports.
    proc = start(out, "--resume")
    time.sleep(1.0)
    proc.kill()
    assert finish(proc)[0] == -signal.SIGKILL

    # 3. `--resume` with no complete checkpoint starts from scratch; killed mid-step 4, after step 3 is logged
    # (checkpoint 2 is complete by then: it is written before step 3 starts).
    proc = start(out, "--resume")
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while '{"step": 3,' not in metrics.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    rc, log = finish(proc)
    assert rc == -signal.SIGKILL, log
    assert "starting from scratch" in log

    # 4. Resumes from step 2, redoes step 3, killed while writing checkpoint 4.
    rc, log = finish(start(out, "--resume", kill_in_save=4))
    assert rc == -signal.SIGKILL, log

    # 5. Resumes from step 2 again and finishes.
    rc, log = finish(start(out, "--resume"))
    assert rc == 0, log

    a = load_pretrained(tmp_path / "straight" / "checkpoints" / f"step-{STEPS:06d}" / "model").state_dict()
    b = load_pretrained(out / "checkpoints" / f"step-{STEPS:06d}" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = list(range(1, STEPS + 1))
    assert logged_steps(out / "metrics.jsonl") == steps
    per_step = 4  # logging.completions_per_step
    assert logged_steps(out / "completions.jsonl") == [s for s in steps for _ in range(per_step)]
    # The logs read as the uninterrupted run's, but for the timings.
    assert logged_steps(out / "completions.jsonl") == logged_steps(tmp_path / "straight" / "completions.jsonl")


def write_lines(path: Path, steps: list[int], torn: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in steps) + torn)


def test_cut_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_lines(log, [1, 2, 3, 4, 5])
    cut_log(log, 3)
    assert logged_steps(log) == [1, 2, 3]
    cut_log(log, 3)  # idempotent: a kill right after the cut changes nothing
    assert logged_steps(log) == [1, 2, 3]
    cut_log(log, 7)  # a checkpoint past the log (log_every > 1) keeps it all
    assert logged_steps(log) == [1, 2, 3]


def test_cut_log_drops_a_line_torn_by_a_kill_mid_write(tmp_path):
    log = tmp_path / "completions.jsonl"
    write_lines(log, [1, 1, 2, 2], torn='{"step": 3, "compl')
    cut_log(log, 2)
    assert log.read_text().endswith("\n") and logged_steps(log) == [1, 1, 2, 2]
    write_lines(log, [1, 2], torn='{"step": 2, "reward": 1.0}')  # whole JSON but no newline: torn as well
    cut_log(log, 2)
    assert log.read_text().count("\n") == 2 and logged_steps(log) == [1, 2]


def test_cut_log_empties_the_log_on_a_fresh_start_and_ignores_a_missing_one(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_lines(log, [1, 2])
    cut_log(log, 0)
    assert log.read_text() == ""
    cut_log(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()


def test_resume_without_a_complete_checkpoint_starts_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    # What a run killed during its first save leaves: logs of steps 1-2 (the last line torn), no checkpoint.
    (out / "checkpoints" / ".tmp-step-000002" / "model").mkdir(parents=True)
    write_lines(out / "metrics.jsonl", [1, 2], torn='{"step": 3')
    write_lines(out / "completions.jsonl", [1, 2])
    assert main(["train", *ARGS, "max_steps=1", "logging.save_every=1", f"output_dir={out}", "--resume"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "scratch" in line] == [
        f"--resume: no complete checkpoint under {out / 'checkpoints'} yet; starting from scratch"]
    assert logged_steps(out / "metrics.jsonl") == [1]
    assert logged_steps(out / "completions.jsonl") == [1] * 4
    assert (out / "checkpoints" / "step-000001").exists()
