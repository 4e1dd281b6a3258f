"""A run's logs: one JSON line of metrics per step (metrics.jsonl), sample completions (completions.jsonl) and
TensorBoard when installed; GRPO and SFT write them the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpointing import cut_log


class MetricsLogger:
    """One JSON line per step (metrics.jsonl), TensorBoard when installed, sample completions (completions.jsonl).
    start_step: the checkpoint's step the run resumes from (0: a fresh start); what the files hold past it was
    logged by a run that died before saving it, and is dropped, since this run logs those steps again."""

    def __init__(self, out: Path, tensorboard: bool, start_step: int = 0):
        for name in ("metrics.jsonl", "completions.jsonl"):
            cut_log(out / name, start_step)
        self.metrics = (out / "metrics.jsonl").open("a")
        self.completions = (out / "completions.jsonl").open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard hides the events of steps >= purge_step written before this one: those being redone.
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, metrics: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(metrics) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    def log_completions(self, step: int, ro: Any, k: int) -> None:
        """The first k completions of `ro` (a rollout batch: prompts, texts, rewards)."""
        for i in range(min(k, len(ro.texts))):
            self.completions.write(json.dumps({"step": step, "prompt": ro.prompts[i], "completion": ro.texts[i],
                                               "reward": float(ro.rewards[i])}) + "\n")
        self.completions.flush()

    def close(self) -> None:
        self.metrics.close()
        self.completions.close()
        if self.tb is not None:
            self.tb.close()
