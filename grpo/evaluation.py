"""The evaluation loop: sample n completions per benchmark problem, grade them, and report pass@k, mean@n
(R1's sampled pass@1), maj@k, format compliance and completion length, overall and broken down by a column;
then the summary table and files. ``grpo eval`` runs :func:`evaluate` on a checkpoint, and the trainer calls
:func:`evaluate_policy` on a held-out set.

The parts live by concept: the estimators in `grpo.estimators`, benchmark loading in `grpo.benchmarks`,
grading in `grpo.grading`, prompt encoding in `grpo.templates`; their public names are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewards.extract import THINK_OPEN

from .benchmarks import (
    BENCHMARK_FILES,
    HUB_BENCHMARKS,
    benchmark_name,
    data_dirs,
    find_benchmark_file,
    load_benchmark,
    load_eval_rows,
    normalize_benchmark_rows,
    read_jsonl,
)
from .estimators import (
    group_answers_many,
    majority_at_k,
    majority_vote,
    math_equivalent_many,
    mean_at_n,
    paired_standard_error,
    pass_at_k,
)
from .grading import Grader, auto_grader_name, grade_samples, resolve_grader
from .rollout.sampling_params import SamplingParams
from .templates import encode_prompt, render_prompt

BREAKDOWN_FIELDS = ("level", "subject")
"""Columns broken down by automatically when every row has them (MATH-500's level and subject)."""
SAMPLE_FIELDS = (
    "problem", "sample", "prompt", "completion", "answer", "gold", "correct", "score", "format_ok", "length",
    "finish_reason",
)
"""Fields of every per-sample record (followed by the row's breakdown fields, when any):
``problem`` (row index), ``sample`` (index among the n), ``prompt`` (the rendered prompt text),
``completion`` (decoded text), ``answer`` (the extracted final answer; None when there is none or
several different ones, and then the sample abstains from maj@k), ``gold`` (the gold
answer), ``correct`` (the grader gave full marks), ``score`` (the grader's raw score; None when it does
not apply, e.g. an unparsable gold), ``format_ok`` (the R1 ``format`` reward is 1), ``length``
(completion tokens, a final EOS included), ``finish_reason`` (``stop`` or ``length``)."""



# ----- the evaluation loop ------------------------------------------------------------------------------
def parse_ks(text: str) -> list[int]:
    """Parse ``"1,8"`` into ``[1, 8]`` (sorted, without repeats).

    Raises:
        ValueError: anything but comma-separated positive integers.
    """
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ValueError(f"k={text!r} is not allowed; use comma-separated positive integers such as 1,8")
    return ks


def check_sampling(n: int, ks: Sequence[int] | None, temperature: float) -> list[int]:
    """Validate the sampling settings of an evaluation and return the ks (default: 1 and n).

    Raises:
        ValueError: ``n < 1``; ``temperature`` 0 (greedy) with ``n > 1`` (the samples would be identical);
            or a k outside ``[1, n]``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; use an integer >= 1 (samples per problem)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed; use 0 (greedy) or a positive value")
    if temperature == 0 and n > 1:
        raise ValueError(
            f"temperature 0 is greedy decoding, so n={n} samples would be identical; use n=1, or a "
            f"temperature > 0 (R1 evaluates with 0.6) for pass@k and maj@k"
        )
    chosen = sorted(set(ks)) if ks else sorted({1, n})
    bad = [k for k in chosen if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"k={', '.join(map(str, bad))} is not allowed with n={n}; each k must be in [1, {n}]")
    return chosen


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    ``summary``: metric -> value over all problems (``pass@k`` per k, ``mean@n``, ``maj@k`` per k > 1,
    ``format``, ``mean_length``, ``clipped_ratio``, ``ungraded``, ``num_problems``, ``num_samples``).
    ``breakdown``: field -> field value -> the same metrics over that value's problems.
    ``samples``: one record per completion (:data:`SAMPLE_FIELDS`). ``config``: the settings used.
    """

    summary: dict[str, float]
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def problem_metrics(
    samples: Sequence[Mapping[str, Any]], ks: Sequence[int], groups: Sequence[int | None]
) -> dict[str, float]:
    """Return one problem's metrics from its n sample records (``correct``, ``format_ok``, ``length``,
    ``finish_reason``, ``score``) and their answers' vote groups (:func:`group_answers_many`): pass@k per
    k, mean@n, maj@k per k > 1, format rate, mean length, clipped rate, ungraded count."""
    n = len(samples)
    correct = [bool(s["correct"]) for s in samples]
    c = sum(correct)
    metrics: dict[str, float] = {f"pass@{k}": pass_at_k(n, c, k) for k in ks}
    metrics[f"mean@{n}"] = mean_at_n(n, c)
    for k in ks:
        if k > 1:
            metrics[f"maj@{k}"] = float(majority_vote(groups, correct, k))
    metrics["format"] = sum(bool(s["format_ok"]) for s in samples) / n
    metrics["mean_length"] = sum(s["length"] for s in samples) / n
    metrics["clipped_ratio"] = sum(s["finish_reason"] == "length" for s in samples) / n
    metrics["ungraded"] = float(sum(s["score"] is None for s in samples))
    return metrics


def aggregate(per_problem: Sequence[Mapping[str, float]], n: int) -> dict[str, float]:
    """Average per-problem metrics over problems (``ungraded`` is summed); adds ``num_problems`` and
    ``num_samples``. Every problem has the same n, so sample-level rates equal their per-problem means."""
    if not per_problem:
        return {"num_problems": 0, "num_samples": 0}
    out: dict[str, float] = {}
    for key in per_problem[0]:
        total = sum(p[key] for p in per_problem)
        out[key] = int(total) if key == "ungraded" else total / len(per_problem)
    return {**out, "num_problems": len(per_problem), "num_samples": len(per_problem) * n}


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def breakdown_fields(rows: Sequence[Mapping[str, Any]], requested: str | Sequence[str] | None) -> list[str]:
    """Return the fields to break down by: ``requested`` (checked to exist in every row), or, when None,
    those of :data:`BREAKDOWN_FIELDS` every row has.

    Raises:
        KeyError: a requested field some row lacks (the message lists the row's columns).
    """
    if requested is None:
        return [f for f in BREAKDOWN_FIELDS if rows and all(f in r for r in rows)]
    fields = [requested] if isinstance(requested, str) else list(requested)
    for f in fields:
        lacking = next((i for i, r in enumerate(rows) if f not in r), None)
        if lacking is not None:
            columns = ", ".join(map(str, rows[lacking]))
            raise KeyError(f"breakdown field {f!r} is missing from row {lacking}; its columns are: {columns}")
    return fields


def evaluate(
    engine: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    template: str = "r1_zero",
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int = 0,
    grader: str | Grader = "auto",
    breakdown_field: str | Sequence[str] | None = None,
    stop: Sequence[str] = (),
    benchmark: str | None = None,
    use_tqdm: bool = False,
    toolbox: Any = None,
    max_tool_calls: int = 4,
) -> EvalResult:
    """Sample ``n`` completions per row with ``engine``, grade them, and compute the metrics.
    (Over 60 lines: half of it is this docstring; the body is one pass: render, generate, grade, aggregate.)

    Args:
        engine: an object with ``generate(prompt_token_ids, params)`` (:class:`grpo.rollout.engine.Engine`
            or the vLLM backend).
        tokenizer: the policy's tokenizer (renders chat templates, encodes prompts, decodes completions).
        rows: benchmark rows (:func:`load_benchmark`) with ``prompt`` and the columns the grader reads.
        template: the prompt template (:data:`grpo.templates.TEMPLATES` or a format string).
        n: samples per problem. ks: the k of pass@k / maj@k, each in [1, n] (default 1 and n).
        temperature: 0 is greedy (then n must be 1). top_p, max_tokens, stop: sampling settings.
        seed: sampling seed; problem i's samples use a seed derived from (seed, i), so a problem's
            completions do not depend on which other problems share the batch.
        grader: ``"auto"``, a reward name or ``module:function`` (:func:`resolve_grader`).
        breakdown_field: field(s) to break metrics down by; None: ``level``/``subject`` when present.
        benchmark: the benchmark's name, recorded in the config.
        use_tqdm: show the engine's progress bar.
        toolbox: a `grpo.tools.Toolbox`: sample multi-turn tool episodes (up to ``max_tool_calls`` calls each;
            our engine only) and add ``tool_calls_per_sample`` and ``tool_call_frequency`` to the summary.

    Raises:
        ValueError: bad sampling settings (:func:`check_sampling`), no rows, or a prompt that does not fit.
        KeyError: a template or breakdown field the rows lack.
    """
    ks = check_sampling(n, ks, temperature)
    if not rows:
        raise ValueError("evaluate got no rows; load a benchmark with at least one problem")
    fields = breakdown_fields(rows, breakdown_field)
    g = resolve_grader(grader, rows)
    prompts = [render_prompt(r, template, tokenizer) for r in rows]
    prompt_ids = [encode_prompt(tokenizer, p, template) for p in prompts]
    greedy = temperature == 0
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop),
                       seed=None if greedy else seed * 1_000_033 + i)
        for i in range(len(rows))
    ]
    if toolbox is None:
        outputs = engine.generate(prompt_ids, params, use_tqdm=use_tqdm)
    else:
        from .rollout.episodes import generate_episodes

        outputs, _ = generate_episodes(engine, prompt_ids, params, toolbox, max_tool_calls, use_tqdm=use_tqdm)
    completions = [c for out in outputs for c in out.completions]
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    sample_rows = [rows[i] for i in range(len(rows)) for _ in range(n)]
    think_in_prompt = all(p.rstrip().endswith(THINK_OPEN) for p in prompts)
    grades = grade_samples(sample_rows, texts, g, prompts=[prompts[i] for i in range(len(rows)) for _ in range(n)],
                           think_in_prompt=think_in_prompt)
    samples: list[dict[str, Any]] = []
    for j, (completion, text, grade) in enumerate(zip(completions, texts, grades)):
        i = j // n
        samples.append({
            "problem": i, "sample": j % n, "prompt": prompts[i], "completion": text, "answer": grade["answer"],
            "gold": rows[i].get("answer"), "correct": grade["correct"], "score": grade["score"],
            "format_ok": grade["format_ok"], "length": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
            **({"tool_calls": len(getattr(completion, "tool_calls", []))} if toolbox is not None else {}),
            **{f: rows[i][f] for f in fields},
        })
    by_problem = [samples[i * n : (i + 1) * n] for i in range(len(rows))]
    if max(ks) > 1:
        groups = group_answers_many([[s["answer"] for s in ss] for ss in by_problem], g.equivalent_many)
    else:
        groups = [[None] * n for _ in by_problem]
    per_problem = [problem_metrics(ss, ks, gs) for ss, gs in zip(by_problem, groups)]
    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    for f in fields:
        values = sorted({str(r[f]) for r in rows}, key=_sort_key)
        breakdown[f] = {
            v: aggregate([m for m, r in zip(per_problem, rows) if str(r[f]) == v], n) for v in values
        }
    config = {
        "benchmark": benchmark, "template": template, "n": n, "ks": ks, "temperature": temperature, "top_p": top_p,
        "max_tokens": max_tokens, "seed": seed, "grader": g.name, "stop": list(stop),
    }
    summary = aggregate(per_problem, n)
    if toolbox is not None:
        config["max_tool_calls"] = max_tool_calls
        summary["tool_calls_per_sample"] = sum(x["tool_calls"] for x in samples) / len(samples)
        summary["tool_call_frequency"] = sum(x["tool_calls"] > 0 for x in samples) / len(samples)
    return EvalResult(summary, breakdown, samples, config)


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    template: str = "r1_zero",
    *,
    engine: Any = None,
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    grader: str | Grader = "auto",
    stop: Sequence[str] = (),
    toolbox: Any = None,
    max_tool_calls: int = 4,
) -> dict[str, float]:
    """Evaluate the policy on held-out rows during training and return flat metrics named ``eval/...``
    (``eval/pass@1``, ``eval/mean@n``, ``eval/maj@k``, ``eval/format``, ``eval/mean_length``, ...).

    ``engine``: the trainer's engine, reused when given (it runs ``model`` in place); otherwise a
    fresh :class:`grpo.rollout.engine.Engine` over ``model``. The model is put in eval mode for the
    generation and its training mode restored afterwards. Other arguments: see :func:`evaluate`.
    """
    if engine is None:
        from .build import build_engine

        engine = build_engine(model, tokenizer, seed=seed)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        result = evaluate(engine, tokenizer, rows, template=template, n=n, ks=ks, temperature=temperature,
                          top_p=top_p, max_tokens=max_tokens, seed=seed, grader=grader, breakdown_field=[],
                          stop=stop, toolbox=toolbox, max_tool_calls=max_tool_calls)
    finally:
        model.train(was_training)
    return {f"eval/{k}": float(v) for k, v in result.summary.items()}


# ----- output ---------------------------------------------------------------------------------------------
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"


def write_eval(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` (config, summary, breakdown) and ``samples.jsonl`` (one record per
    completion) into ``out_dir`` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, samples_path = out / SUMMARY_FILE, out / SAMPLES_FILE
    summary = {"config": result.config, "summary": result.summary, "breakdown": result.breakdown}
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with samples_path.open("w") as f:
        for record in result.samples:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return summary_path, samples_path


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float) and key in ("mean_length", "length"):
        return f"{value:.1f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _rate_keys(summary: Mapping[str, float]) -> list[str]:
    return [k for k in summary if k.startswith(("pass@", "mean@", "maj@"))] + ["format"]


def format_table(result: EvalResult) -> str:
    """Return a plain-text report: a header line with the settings, the summary metrics, then one table
    per breakdown field (problems and rate metrics per value)."""
    c, s = result.config, result.summary
    header = (
        f"benchmark {c.get('benchmark') or '(rows)'}: {s.get('num_problems', 0)} problems, n={c.get('n')}, "
        f"temperature {c.get('temperature')}, top_p {c.get('top_p')}, max_tokens {c.get('max_tokens')}, "
        f"template {c.get('template')}, grader {c.get('grader')}"
    )
    keys = [*_rate_keys(s), "mean_length", "clipped_ratio", "ungraded"]
    width = max(len(k) for k in keys) + 2
    lines = [header, f"{'metric':<{width}}value", *(f"{k:<{width}}{_cell(k, s[k])}" for k in keys if k in s)]
    for name, table in result.breakdown.items():
        rate = _rate_keys(s)
        first = max([len(name), *(len(v) for v in table)]) + 2
        cols = ["problems", *rate]
        lines += ["", f"by {name}", f"{name:<{first}}" + "".join(f"{col:>10}" for col in cols)]
        for value, m in table.items():
            cells = [str(m.get("num_problems", 0)), *(_cell(k, m[k]) if k in m else "-" for k in rate)]
            label = value if len(value) <= 40 else value[:37] + "..."
            lines.append(f"{label:<{first}}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def resolve_model_dir(path: str | Path) -> Path:
    """Return the model directory of ``path``: itself when it holds ``config.json``, its ``model/``
    (a trainer checkpoint ``step-N``), or the newest checkpoint's model under a run directory.

    Raises:
        FileNotFoundError: none of these exists (the message says what was looked for).
    """
    from .checkpointing import latest_checkpoint

    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is not None and (latest / "model" / "config.json").is_file():
        return latest / "model"
    raise FileNotFoundError(
        f"no checkpoint at {str(p)!r}: expected a model directory with config.json, a trainer checkpoint "
        f"(step-N/model/config.json) or a run directory with checkpoints/step-N"
    )


__all__ = [
    "BENCHMARK_FILES",
    "HUB_BENCHMARKS",
    "SAMPLE_FIELDS",
    "EvalResult",
    "Grader",
    "aggregate",
    "auto_grader_name",
    "benchmark_name",
    "check_sampling",
    "data_dirs",
    "encode_prompt",
    "evaluate",
    "evaluate_policy",
    "find_benchmark_file",
    "format_table",
    "grade_samples",
    "group_answers_many",
    "load_benchmark",
    "load_eval_rows",
    "majority_at_k",
    "majority_vote",
    "math_equivalent_many",
    "mean_at_n",
    "normalize_benchmark_rows",
    "paired_standard_error",
    "parse_ks",
    "pass_at_k",
    "problem_metrics",
    "read_jsonl",
    "resolve_grader",
    "resolve_model_dir",
    "write_eval",
]
