"""Plots: a run's metrics.jsonl becomes readable PNG curves, one per panel with data."""

import json
import math

import pytest

from grpo.plot import plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=60, with_eval=True):
    lines = []
    for step in range(1, steps + 1):
        progress = step / steps
        record = {
            "step": step,
            "reward": 0.2 + 0.6 * progress + 0.05 * math.sin(step),
            "reward_std": 0.3 - 0.1 * progress,
            "rewards/accuracy/mean": 0.1 + 0.7 * progress,
            "rewards/format/mean": min(1.0, 0.5 + progress),
            "completions/mean_length": 40 - 10 * progress,
            "completions/max_length": 64,
            "kl": 0.001 * step,
            "entropy": 1.5 - progress,
            "clip_ratio/low_mean": 0.01 * progress,
            "clip_ratio/high_mean": 0.02 * progress,
            "loss": 0.01 * math.cos(step),
        }
        if with_eval and step % 20 == 0:
            record |= {"eval/pass@1": 0.5 * progress, "eval/mean_length": 30.0}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_run_writes_a_valid_png_per_panel_with_data(tmp_path):
    write_metrics(tmp_path)
    paths = plot_run(tmp_path)
    names = [p.name for p in paths]
    assert names == [
        "reward.png", "completion_length.png", "kl.png", "entropy.png", "clip_ratio.png", "optimization.png", "eval.png",
    ]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_a_tool_run_gets_a_tool_use_panel(tmp_path):
    records = [{"step": s, "reward": 0.1 * s, "tools/call_frequency": 0.5 + 0.1 * s, "tools/calls_per_completion": 0.6,
                "tools/failure_frequency": 0.0, "tools/call_seconds": 0.2} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "tools.png"]
    assert paths[1].read_bytes().startswith(PNG_SIGNATURE)


def test_panels_without_data_are_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "reward": 0.1}) + "\n" + json.dumps({"step": 2, "reward": 0.3, "kl": None}) + "\n"
    )
    assert [p.name for p in plot_run(tmp_path)] == ["reward.png"]


def test_missing_or_empty_metrics_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file at .*metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty: no metrics were logged yet"):
        plot_run(tmp_path)


def test_a_last_line_cut_short_is_dropped_but_a_bad_line_inside_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    assert read_metrics(path) == [{"step": 1, "reward": 0.5}]
    path.write_text('{"step": 1, "rew\n{"step": 2, "reward": 0.5}\n')
    with pytest.raises(ValueError, match="line 1: not JSON"):
        read_metrics(path)
