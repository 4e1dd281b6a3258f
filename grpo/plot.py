"""Training curves: reads a run's ``metrics.jsonl`` (TRL's metric names) and draws one PNG per panel.

Panels (:data:`PANELS`): reward (with each reward function), completion length, truncation, KL, entropy,
clip ratios, optimization (loss, grad norm, learning rate), evaluation, and tool use (with `tools`: the share of
completions that call, calls per completion, the share of calls that failed); a panel with no data is skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Series = tuple[list[float], list[float]]
"""(steps, values) of one metric, only where it was logged with a finite number."""


@dataclass(frozen=True)
class Panel:
    """One figure: a file name, a title, the metrics it draws (a predicate over metric names), and
    whether they share one plot or get one small plot each (for metrics on different scales)."""

    name: str
    title: str
    ylabel: str
    select: Callable[[str], bool]
    separate: bool = False


PANELS = (
    Panel("reward", "Reward", "reward", lambda k: k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))),
    Panel(
        "completion_length",
        "Completion length",
        "tokens",
        lambda k: k.startswith("completions/") and k.endswith("_length"),
    ),
    Panel("truncated", "Completions cut at the length limit", "share", lambda k: k == "completions/clipped_ratio"),
    Panel("kl", "KL to the reference", "KL", lambda k: k == "kl"),
    Panel("entropy", "Token entropy", "nats", lambda k: k == "entropy"),
    Panel("clip_ratio", "Clipped ratio share", "share of tokens", lambda k: k.startswith("clip_ratio/")),
    Panel("optimization", "Optimization", "", lambda k: k in ("loss", "grad_norm", "learning_rate"), separate=True),
    Panel("eval", "Evaluation", "", lambda k: k.startswith("eval/"), separate=True),
    Panel("tools", "Tool use (tool episodes)", "per completion",
          lambda k: k in ("tools/call_frequency", "tools/calls_per_completion", "tools/failure_frequency")),
)
"""The panels, each drawn into ``plots/<name>.png`` when any of its metrics was logged."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a ``metrics.jsonl`` (one JSON object a line); blank lines are skipped.

    A last line cut short (a run killed mid-write) is dropped; any other bad line is an error.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no records, or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}; a training run writes one line per step there")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for k, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if k == len(lines) - 1 and records:
                break
            raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: a record must be a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} is empty: no metrics were logged yet")
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def collect_series(records: list[dict[str, Any]]) -> dict[str, Series]:
    """Return each numeric metric's (steps, values); the step is the record's ``step``, else its line number."""
    series: dict[str, Series] = {}
    for i, record in enumerate(records, 1):
        step = _number(record.get("step"))
        x = step if step is not None else float(i)
        for key, value in record.items():
            y = _number(value)
            if key != "step" and y is not None:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(x)
                ys.append(y)
    return series


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _draw(ax: Any, key: str, xs: list[float], ys: list[float], color: Any) -> None:
    """Draw one metric: raw points, and a moving average over them when there are many."""
    label = key.removeprefix("rewards/").removesuffix("/mean") if key.startswith("rewards/") else key
    if len(ys) > 30:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(ys, max(2, len(ys) // 20)), color=color, linewidth=1.8, label=label)
    else:
        ax.plot(xs, ys, color=color, linewidth=1.5, marker="o" if len(ys) < 15 else None, markersize=3, label=label)


def _new_figure(rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * cols if cols > 1 else 7.5, 4.2 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _reward_band(ax: Any, series: dict[str, Series], color: Any) -> None:
    """Shade reward ± reward_std at the steps where both were logged."""
    xs, ys = series["reward"]
    std_by_step = dict(zip(*series["reward_std"]))
    pairs = [(x, y, std_by_step[x]) for x, y in zip(xs, ys) if x in std_by_step]
    if pairs:
        px, py, ps = zip(*pairs)
        ax.fill_between(px, [y - s for y, s in zip(py, ps)], [y + s for y, s in zip(py, ps)],
                        color=color, alpha=0.12, linewidth=0, label="reward ± std")


def _draw_panel(panel: Panel, series: dict[str, Series], out: Path) -> Path | None:
    """Draw one panel into ``out/<name>.png``; return None (and write nothing) when it has no metric."""
    keys = sorted((k for k in series if panel.select(k)), key=lambda k: (k != "reward", k))
    if not keys:
        return None
    colors = _colors()
    if not panel.separate:
        fig, axes = _new_figure()
        ax = axes[0][0]
        for i, key in enumerate(keys):
            _draw(ax, key, *series[key], colors[i % len(colors)])
        if "reward" in keys and "reward_std" in series:
            _reward_band(ax, series, colors[0])
        ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        return _save(fig, out / f"{panel.name}.png")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = _new_figure(rows, cols)
    for i, key in enumerate(keys):
        ax = axes[i // cols][i % cols]
        _draw(ax, key, *series[key], colors[i % len(colors)])
        ax.set(title=key.removeprefix("eval/"), xlabel="step")
        ax.grid(alpha=0.3)
    for j in range(len(keys), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(panel.title)
    return _save(fig, out / f"{panel.name}.png")


def _colors() -> list[Any]:
    from matplotlib import colormaps

    return list(colormaps["tab10"].colors)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw the curves of a run from ``run_dir/metrics.jsonl`` into ``run_dir/plots/*.png``.

    Returns:
        The PNG files written, in :data:`PANELS` order; panels without data are skipped.

    Raises:
        FileNotFoundError: ``run_dir/metrics.jsonl`` does not exist.
        ValueError: it is empty, malformed, or holds no numeric metric.
    """
    run_dir = Path(run_dir)
    series = collect_series(read_metrics(run_dir / "metrics.jsonl"))
    if not series:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no numeric metric to plot")
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [_draw_panel(panel, series, out) for panel in PANELS]
    return [p for p in written if p is not None]
