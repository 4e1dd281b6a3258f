"""Training checkpoints: the model in our Hugging Face format plus optimizer, scheduler, RNG states, data
position and step, written atomically (a temporary directory, then a rename); the last K are kept, and
`--resume` finds the newest complete one."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():  # the current GPU's generator only: reading all would wake every GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any], keep_last: int) -> Path:
    """Writes output_dir/checkpoints/step-N atomically, then prunes all but the newest `keep_last`."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    # Test-only: GRPO_TEST_KILL_IN_SAVE=N makes the process SIGKILL itself halfway through writing checkpoint N
    # (model written, trainer state not), so tests/test_resume.py can kill a run during a save deterministically.
    if os.environ.get("GRPO_TEST_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # only a complete checkpoint ever carries the step-N name
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state, its tensors on the CPU whatever device wrote them (a run saved on a GPU resumes on a
    CPU too); the optimizer and the models move what they load onto their own device."""
    return torch.load(checkpoint / STATE_FILE, weights_only=False, map_location="cpu")


def cut_log(path: str | Path, step: int) -> None:
    """Cuts a JSON-lines log (one object with a "step" per line, in step order) back to its lines of steps <= `step`,
    so that a run that restarts after `step` logs each step once: `step` is the checkpoint a run resumes from, 0 on
    a fresh start (which empties the log). The cut is at the first line past `step`, or torn by a kill mid-write
    (no newline, or not such JSON); everything after it goes. One truncate call: a kill leaves it done or not."""
    path = Path(path)
    if not path.exists():
        return
    keep = 0
    with path.open("rb") as f:
        for line in f:
            try:
                ok = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                break
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)
