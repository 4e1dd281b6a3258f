"""The whole R1 recipe in one call: cold-start SFT, GRPO from the SFT model, then both checkpoints evaluated
on the same held-out problems; writes report.json, report.md and the training curves under output_dir."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from model import load_pretrained

from .benchmarks import load_eval_rows
from .build import build_engine, build_tokenizer, build_toolbox, resolve_device
from .checkpointing import latest_checkpoint
from .config import Recipe
from .estimators import paired_standard_error
from .evaluation import evaluate
from .sft import SFTTrainer
from .trainer import GRPOTrainer


def held_out_rows(recipe: Recipe) -> list[dict[str, Any]]:
    """The evaluation problems, read as training's periodic evaluation reads them (the test split of the data
    source, or data.eval_source as a benchmark), `evaluation.limit` of them."""
    return load_eval_rows(dataclasses.replace(recipe.data, eval_limit=recipe.evaluation.limit), seed=recipe.seed)


def evaluate_checkpoint(recipe: Recipe, model_dir: Path, rows: list[dict[str, Any]], tools: bool = True,
                        device: torch.device | None = None) -> dict[str, Any]:
    """The checkpoint, loaded onto `device` (default: the recipe's, `resolve_device`), scored: pass@1 (the
    mean over `evaluation.n` samples at `evaluation.temperature`), format compliance, mean length, one
    correct completion as an example, and each problem's pass@1 (`per_problem_pass@1`, in the order of
    `rows`, for paired comparisons). With the recipe's tools (unless tools=False) the samples are tool
    episodes, and `tool_call_rate` is the share of samples that call."""
    e = recipe.evaluation
    tokenizer = build_tokenizer(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=str(model_dir))))
    device = resolve_device(recipe.device) if device is None else device
    model = load_pretrained(model_dir, device=device).eval()
    engine = build_engine(model, tokenizer, recipe.rollout, seed=recipe.seed, dtype=recipe.model.dtype,
                          checkpoint_dir=model_dir)
    result = evaluate(engine, tokenizer, rows, template=recipe.data.template, n=e.n, ks=[1],
                      temperature=e.temperature, max_tokens=recipe.sampling.max_completion_length, seed=recipe.seed,
                      breakdown_field=[], toolbox=build_toolbox(recipe) if tools else None,
                      max_tool_calls=recipe.tools.max_tool_calls)
    s = result.summary
    per_problem = [0.0] * len(rows)
    for x in result.samples:
        per_problem[x["problem"]] += bool(x["correct"]) / e.n
    example = next((x for x in result.samples if x.get("correct")), result.samples[0] if result.samples else None)
    return {"pass@1": s["pass@1"], "format": s.get("format"), "mean_length": s.get("mean_length"),
            "example": {"prompt": example["prompt"], "completion": example["completion"], "correct": example["correct"]}
            if example else None, "per_problem_pass@1": per_problem, "tool_call_rate": s.get("tool_call_frequency")}


def run_r1(recipe: Recipe) -> dict[str, Any]:
    """SFT -> evaluate -> GRPO -> evaluate; returns (and writes) the report."""
    out = Path(recipe.output_dir)
    device = resolve_device(recipe.device)  # before any work: a recipe asking for a missing GPU stops here
    rows = held_out_rows(recipe)
    report: dict[str, Any] = {"recipe": recipe.output_dir, "device": str(device), "held_out_problems": len(rows),
                              "eval": dataclasses.asdict(recipe.evaluation), "stages": {}}

    t = time.perf_counter()
    sft = SFTTrainer(recipe, device)
    sft.train()
    report["stages"]["sft"] = {"seconds": round(time.perf_counter() - t, 1), "steps": recipe.sft.steps}
    sft_model = sft.out / "model"

    t = time.perf_counter()
    report["sft_eval"] = evaluate_checkpoint(recipe, sft_model, rows, device=device)
    if recipe.tools.names:  # the same checkpoint without its tools: what the tools add
        report["sft_eval_no_tools"] = evaluate_checkpoint(recipe, sft_model, rows, tools=False, device=device)
    report["stages"]["eval_sft"] = {"seconds": round(time.perf_counter() - t, 1)}

    t = time.perf_counter()
    grpo_recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=str(sft_model), preset=None,
                                                                        tokenizer=None))
    trainer = GRPOTrainer(grpo_recipe, device=device)
    history = trainer.train()
    report["stages"]["grpo"] = {"seconds": round(time.perf_counter() - t, 1), "steps": recipe.max_steps}
    final_model = latest_checkpoint(out) / "model"  # train() saves the last step

    t = time.perf_counter()
    report["grpo_eval"] = evaluate_checkpoint(recipe, final_model, rows, device=device)
    if recipe.tools.names:
        report["grpo_eval_no_tools"] = evaluate_checkpoint(recipe, final_model, rows, tools=False, device=device)
    report["stages"]["eval_grpo"] = {"seconds": round(time.perf_counter() - t, 1)}
    report["total_seconds"] = round(sum(s["seconds"] for s in report["stages"].values()), 1)
    report["pass@1_gain"] = report["grpo_eval"]["pass@1"] - report["sft_eval"]["pass@1"]
    # The same problems before and after: the gain's noise is that of the per-problem differences.
    if len(rows) >= 2:
        report["pass@1_gain_stderr"] = paired_standard_error(report["grpo_eval"]["per_problem_pass@1"],
                                                             report["sft_eval"]["per_problem_pass@1"])
    first, last = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10):]
    report["reward_first_steps"] = sum(h["reward"] for h in first) / len(first)
    report["reward_last_steps"] = sum(h["reward"] for h in last) / len(last)
    if recipe.tools.names:
        report["tool_call_rate_first_steps"] = sum(h["tools/call_frequency"] for h in first) / len(first)
        report["tool_call_rate_last_steps"] = sum(h["tools/call_frequency"] for h in last) / len(last)
        report["tool_call_rate_by_step"] = [round(h["tools/call_frequency"], 4) for h in history]
        best_without = max(report["sft_eval_no_tools"]["pass@1"], report["grpo_eval_no_tools"]["pass@1"])
        report["pass@1_tools_over_best_without"] = report["grpo_eval"]["pass@1"] - best_without
        if len(rows) >= 2:  # paired over the same problems, against the better of the two runs without tools
            without = max((report["sft_eval_no_tools"], report["grpo_eval_no_tools"]), key=lambda r: r["pass@1"])
            report["pass@1_tools_over_best_without_stderr"] = paired_standard_error(
                report["grpo_eval"]["per_problem_pass@1"], without["per_problem_pass@1"])

    from .plot import plot_run

    report["plots"] = [str(p) for p in plot_run(out)]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: the before/after table, the time of each stage, an example completion."""
    e, s, g = report["eval"], report["sft_eval"], report["grpo_eval"]
    lines = [
        f"Held-out problems: {report['held_out_problems']}, {e['n']} samples each at temperature {e['temperature']}.",
        "",
        "| checkpoint | pass@1 | format | mean length |",
        "|---|---|---|---|",
        f"| after SFT | {s['pass@1']:.3f} | {s['format']:.3f} | {s['mean_length']:.1f} |",
        f"| after GRPO | {g['pass@1']:.3f} | {g['format']:.3f} | {g['mean_length']:.1f} |",
        "",
        *(_tools_table(report) if "sft_eval_no_tools" in report else []),
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {v['seconds']:.1f} |" for name, v in report["stages"].items()],
        f"| total | {report['total_seconds']:.1f} |",
    ]
    if "pass@1_gain_stderr" in report:
        lines += ["", f"GRPO changed held-out pass@1 by {report['pass@1_gain']:+.3f} (standard error "
                      f"{report['pass@1_gain_stderr']:.3f}, paired over the same problems)."]
    if g.get("example"):
        verdict = "a correct one" if g["example"]["correct"] else "no completion was correct; the first one"
        lines += ["", f"An example after GRPO ({verdict}):", "", "```", g["example"]["prompt"] + g["example"]["completion"],
                  "```"]
    return "\n".join(lines) + "\n"


def _tools_table(report: dict[str, Any]) -> list[str]:
    """With tools: pass@1 with and without them for both checkpoints, and the tool-call rate."""
    rows = [("after SFT", report["sft_eval"], report["sft_eval_no_tools"]),
            ("after GRPO", report["grpo_eval"], report["grpo_eval_no_tools"])]
    return [
        "| checkpoint | pass@1 with tools | pass@1 without tools | tool-call rate |",
        "|---|---|---|---|",
        *[f"| {name} | {w['pass@1']:.3f} | {wo['pass@1']:.3f} | {w['tool_call_rate']:.3f} |" for name, w, wo in rows],
        "",
        f"GRPO with tools minus the best pass@1 without: {report['pass@1_tools_over_best_without']:+.3f}"
        + (f" (standard error {report['pass@1_tools_over_best_without_stderr']:.3f}, paired)"
           if "pass@1_tools_over_best_without_stderr" in report else "") + "; "
        f"tool-call rate in training {report['tool_call_rate_first_steps']:.3f} (first steps) -> "
        f"{report['tool_call_rate_last_steps']:.3f} (last steps).",
        *_rate_over_steps(report.get("tool_call_rate_by_step", [])),
        "",
    ]


def _rate_over_steps(rates: list[float], points: int = 10) -> list[str]:
    """The tool-call rate of GRPO's rollouts over its steps (at most `points` of them, evenly spaced), one line."""
    if not rates:
        return []
    picks = sorted({round(i * (len(rates) - 1) / max(points - 1, 1)) for i in range(min(points, len(rates)))})
    return ["Tool-call rate over GRPO steps: " + ", ".join(f"step {i + 1}: {rates[i]:.2f}" for i in picks) + "."]
