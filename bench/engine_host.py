"""The rollout engine's host time per decode step: its own Python (scheduling, block allocation, building the
step's inputs, copying them into the step's buffers, reading the sampled tokens back, appending them to the
sequences, stop checks), with the model's work stubbed out, so it can be measured on a CPU.

On a GPU a decode step is a CUDA graph replay plus this host path around it (bench/gpu.py measured 2.66 ms of
replay and 4.11 ms inside the engine at batch 128); here the replay is replaced by a stub that returns a fixed
output of the right shape at once, so what is left is the host path alone.

What is timed: `Engine.generate` of B/8 prompts (32 random tokens each) x n=8 samples (temperature 1, seeded,
EOS ignored) on the `micro` preset, in two workloads: "uniform", every sample `--tokens` long (all B sequences
decode every step: the steady state), and "ragged", each sample its own length, spread evenly over
[tokens/2, tokens) (from halfway on, sequences leave the batch one by one, as they do when samples end at EOS).
Prefill runs the real model (it is not counted); every decode step's model work is the stub:
  - "buffers" (the CUDA-graph path's host logic, `ModelRunner(decode_path="buffers")`, with the GPU's counter
    sampler): `DecodeGraphs._step`, the computation a graph captures (model and sampler), returns a fixed
    [2, P] tokens/log-probs tensor, as a replay leaves its output in a static buffer;
  - "overlap": the buffers path with `Engine(overlap=True)`, each step launched before the last one's tokens
    are read (on a CPU nothing runs at the same time, so this is overlap's own host cost; on a GPU the host
    path then runs while the device replays the step);
  - "eager" (the CPU's path, with its default generator sampler): the model's `hidden_states` and `logits`
    return fixed tensors; the staging copy and the host sampler (over a 256-token vocabulary) still run.
A step is the time from one `Scheduler.schedule` call to the next; the figures are the median over a run's
decode steps and the mean (which counts the last step's finishing work, and in "ragged" the shrinking batch),
then the median of each over repeats. A second, instrumented run per repeat splits a step into phases (own time
of the engine's methods, mean per decode step, the last one left out; the wrappers add about a microsecond per
call, so the phases add up to a little more than a step); "loop" is what is left: `generate`'s own lines.

    python bench/engine_host.py [--batches 32,128,256] [--tokens 128] [--repeats 5] [--paths buffers,overlap,eager]
                                [--workloads uniform,ragged] [--threads 1] [--profile]

`--profile` also prints the functions the host spends most own time in (cProfile, one uniform run at the
largest batch, buffers path). Last line: one JSON object; `step_ms` is the uniform workload at batch 128 on the
buffers path (median), `ragged_mean_step_ms` the ragged one (mean); `workloads` has every figure."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

# What is timed -> (the engine's decode path, the sampler it is timed with, overlap)
PATHS = {"buffers": ("buffers", "counter", False), "overlap": ("buffers", "counter", True),
         "eager": ("eager", "generator", False)}
GROUP = 8  # samples per prompt (GRPO's group size)
PROMPT_TOKENS = 32
VOCAB = 256
STUB = ("model", "the model's step, stubbed: a fixed output of the right shape")
# (class, method, phase): each method's own time (its callees' left out) is charged to its phase. A class or
# method the engine does not have (another version of it) is skipped, so one script times before and after.
PHASES = [
    ("Scheduler", "schedule", "schedule"),
    ("ModelRunner", "copy_blocks", "schedule"),
    ("ModelRunner", "forward", "inputs"),
    ("ModelRunner", "decode_tokens", "inputs"),
    ("ModelRunner", "launch_decode", "inputs"),
    ("ModelRunner", "_decode_buffered", "inputs"),
    ("ModelRunner", "_staged_view", "inputs"),
    ("DecodeBatch", "write", "inputs"),
    ("DecodeGraphs", "_run", "inputs"),
    ("DecodeGraphs", "run", "inputs"),
    ("DecodeGraphs", "tokens", "readback"),
    ("DecodeGraphs", "logits", "readback"),
    ("DecodeGraphs", "read_tokens", "readback"),
    ("DecodeGraphs", "start_read", "readback"),
    ("DecodeGraphs", "tokens_of", "readback"),
    ("PendingStep", "result", "readback"),
    ("Engine", "_sample", "sample"),
    ("Engine", "_append", "append"),
]


class StepClock:
    """Marks each step's start (a `Scheduler.schedule` call) and, when `phases`, charges the own time of the
    methods of PHASES to the current step."""

    def __init__(self, classes: dict[str, type], phases: bool):
        self.steps: list[dict] = []  # per step: start, prefill, {phase: seconds}
        self.stack: list[float] = []  # the callees' time of each timed call in progress
        self.undo: list[tuple[type, str, object]] = []
        scheduler = classes["Scheduler"]
        self._patch(scheduler, "schedule", self._marking(scheduler.schedule, "schedule" if phases else None))
        if phases:
            for owner, name, phase in PHASES[1:]:
                cls = classes.get(owner)
                if cls is None or name not in vars(cls):
                    continue
                raw = vars(cls)[name]
                if isinstance(raw, staticmethod):
                    self._patch(cls, name, staticmethod(self.timed(raw.__func__, phase)))
                else:
                    self._patch(cls, name, self.timed(raw, phase))

    def _patch(self, cls: type, name: str, fn) -> None:
        self.undo.append((cls, name, vars(cls)[name]))
        setattr(cls, name, fn)

    def remove(self) -> None:
        for cls, name, fn in reversed(self.undo):
            setattr(cls, name, fn)

    def _marking(self, fn, phase: str | None):
        timed = self.timed(fn, phase) if phase else fn

        @functools.wraps(fn)
        def schedule(*args, **kw):
            self.steps.append({"start": time.perf_counter(), "phases": {}})
            out = timed(*args, **kw)
            self.steps[-1]["prefill"] = out[1]
            return out

        return schedule

    def timed(self, fn, phase: str):
        @functools.wraps(fn)
        def call(*args, **kw):
            self.stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t0
                callees = self.stack.pop()
                if self.stack:
                    self.stack[-1] += dt
                if self.steps:
                    phases = self.steps[-1]["phases"]
                    phases[phase] = phases.get(phase, 0.0) + dt - callees

        return call

    def decode_steps(self, end: float) -> list[dict]:
        """The decode steps, each with its duration."""
        out = []
        for i, step in enumerate(self.steps):
            stop = self.steps[i + 1]["start"] if i + 1 < len(self.steps) else end
            if not step.get("prefill", True):
                out.append({**step, "seconds": stop - step["start"]})
        return out


def classes() -> dict[str, type]:
    from grpo.rollout.cuda_graphs import DecodeGraphs
    from grpo.rollout.engine import Engine
    from grpo.rollout.model_runner import ModelRunner
    from grpo.rollout.scheduler import Scheduler

    found = {"Scheduler": Scheduler, "ModelRunner": ModelRunner, "DecodeGraphs": DecodeGraphs, "Engine": Engine}
    try:
        from grpo.rollout.model_runner import PendingStep

        found["PendingStep"] = PendingStep
    except ImportError:  # an engine from before overlap
        pass
    try:
        from grpo.rollout.decode_batch import DecodeBatch

        found["DecodeBatch"] = DecodeBatch
    except ImportError:  # an engine from before the persistent batch
        pass
    return found


def make_engine(path: str, batch: int, tokens: int, clock_phases: list):
    """An engine over the micro model whose decode steps' model work is a stub (charged to phase 'model')."""
    from grpo.rollout.engine import Engine
    from model import build_model
    from model.presets import preset_config

    model = build_model(preset_config("micro", vocab_size=VOCAB), seed=0).eval()
    block_size = 16
    per_seq = -(-(PROMPT_TOKENS + tokens) // block_size) + 1
    engine = Engine(model, block_size=block_size, num_blocks=batch * per_seq + 64, max_num_seqs=batch,
                    decode_path=PATHS[path][0], sampler=PATHS[path][1], overlap=PATHS[path][2], seed=0)

    def charge(fn):
        """The stub's time goes to 'model' when phases are being timed."""
        @functools.wraps(fn)
        def call(*args, **kw):
            if not clock_phases:
                return fn(*args, **kw)
            return clock_phases[0].timed(fn, STUB[0])(*args, **kw)

        return call

    if PATHS[path][0] == "buffers":
        graphs = engine.runner.decode_graphs
        P = graphs.max_batch
        tokens_out = torch.stack([torch.arange(P, dtype=torch.float64) % (VOCAB - 3) + 3,
                                  torch.full((P,), -1.5, dtype=torch.float64)])  # no EOS (2) among them
        logits_out = torch.randn(P, VOCAB, generator=torch.Generator().manual_seed(0))

        def step(size: int, sampled: bool, width: int | None = None) -> torch.Tensor:
            return tokens_out[:, :size] if sampled else logits_out[:size]

        graphs._step = charge(step)
    else:
        hidden_states, logits = model.hidden_states, model.logits
        H = torch.randn(batch, 1, model.config.hidden_size)
        L = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(0))
        decoding = [False]

        def hidden(ids, positions, cache=None, absorb=False, **kw):
            decoding[0] = absorb
            return H[: ids.shape[0]] if absorb else hidden_states(ids, positions, cache=cache, absorb=absorb, **kw)

        def head(last):
            return L[: last.shape[0]] if decoding[0] else logits(last)

        model.hidden_states, model.logits = charge(hidden), charge(head)
    return engine


def workload(batch: int, tokens: int, ragged: bool) -> tuple[list[list[int]], list]:
    """batch/8 prompts x 8 samples (temperature 1, seeded, EOS ignored): every sample `tokens` long, or (ragged)
    each its own length, spread evenly over [tokens/2, tokens) (identical prompts share their prefill and blocks,
    so each group is still one prefill)."""
    from grpo.rollout import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, VOCAB, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(max(1, batch // GROUP))]
    if not ragged:
        return prompts, [SamplingParams(n=GROUP, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0)] * len(prompts)
    rows = [p for p in prompts for _ in range(GROUP)]
    return rows, [SamplingParams(temperature=1.0, max_tokens=tokens // 2 + j * (tokens - tokens // 2) // len(rows),
                                 ignore_eos=True, seed=j) for j in range(len(rows))]


def run_once(engine, prompts, params, phases: bool, clock_phases: list) -> dict:
    """One generate; its decode steps' median and mean (ms) and, with phases, each phase's mean (ms per step)."""
    clock = StepClock(classes(), phases)
    clock_phases[:] = [clock] if phases else []
    try:
        engine.generate(prompts, params)
        end = time.perf_counter()
    finally:
        clock.remove()
        clock_phases.clear()
    steps = clock.decode_steps(end)
    seconds = [s["seconds"] for s in steps]
    out = {"median_ms": statistics.median(seconds) * 1e3, "mean_ms": statistics.fmean(seconds) * 1e3,
           "decode_steps": len(steps)}
    if phases:
        body = steps[:-1] or steps  # the last step also builds every completion: once per sequence, not per step
        names = sorted({k for s in body for k in s["phases"]})
        mean = {k: statistics.fmean(s["phases"].get(k, 0.0) for s in body) * 1e3 for k in names}
        mean["loop"] = statistics.fmean(s["seconds"] for s in body) * 1e3 - sum(mean.values())
        out["phases_ms"] = mean
    return out


def measure(path: str, batch: int, tokens: int, repeats: int, ragged: bool) -> dict:
    prompts, params = workload(batch, tokens, ragged)
    clock_phases: list = []
    engine = make_engine(path, batch, tokens, clock_phases)
    run_once(engine, *workload(batch, 4, False), False, clock_phases)  # warm-up: allocations, the first steps
    plain, timed = [], []
    for _ in range(repeats):  # alternate, so a slow spell of the machine hits both alike
        plain.append(run_once(engine, prompts, params, False, clock_phases))
        timed.append(run_once(engine, prompts, params, True, clock_phases))
    phases = {k: round(statistics.median(r["phases_ms"][k] for r in timed), 4) for k in timed[0]["phases_ms"]}
    return {"batch": batch, "sampler": PATHS[path][1], "decode_steps": plain[0]["decode_steps"],
            "step_ms": round(statistics.median(r["median_ms"] for r in plain), 4),
            "mean_step_ms": round(statistics.median(r["mean_ms"] for r in plain), 4),
            "runs_step_ms": [round(r["median_ms"], 4) for r in plain],
            "phases_ms": phases, "phases_total_ms": round(sum(phases.values()), 4)}


def profile(path: str, batch: int, tokens: int, n: int = 15) -> list[dict]:
    """The n functions with the most own time in one run (ms per decode step; cProfile inflates them)."""
    import cProfile
    import pstats

    prompts, params = workload(batch, tokens, False)
    engine = make_engine(path, batch, tokens, [])
    engine.generate(*workload(batch, 4, False))
    prof = cProfile.Profile()
    prof.enable()
    engine.generate(prompts, params)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})"[:80], "ms_per_step": round(v[2] * 1e3 / tokens, 4),
             "calls": v[1]} for k, v in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,128,256", help="comma-separated batch sizes (multiples of 8)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per sequence (decode steps per run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paths", default="buffers,overlap,eager", help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--workloads", default="uniform,ragged",
                    help="comma-separated: uniform (all samples end together), ragged (each its own length)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the top functions (cProfile) of the buffers path")
    args = ap.parse_args()
    from machine import cpu_info, describe

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(paths) - set(PATHS)) + sorted(set(workloads) - {"uniform", "ragged"})
    if unknown:
        ap.error(f"unknown {', '.join(unknown)}: --paths are {', '.join(PATHS)}; --workloads uniform, ragged")
    if any(b < 1 for b in batches) or args.tokens < 4 or args.repeats < 1:
        ap.error("--batches must be positive, --tokens at least 4, --repeats at least 1")
    cpu = cpu_info(args.threads)
    print(f"CPU: {describe(cpu)}, {args.threads} threads", flush=True)

    results: dict[str, dict[str, dict[str, dict]]] = {w: {} for w in workloads}
    for work in workloads:
        for path in paths:
            results[work][path] = {}
            for batch in batches:
                r = results[work][path][str(batch)] = measure(path, batch, args.tokens, args.repeats, work == "ragged")
                phases = "  ".join(f"{k} {v:.3f}" for k, v in r["phases_ms"].items())
                print(f"{work:8}{path:8} batch {batch:4}: {r['step_ms']:.3f} ms/step (median; mean "
                      f"{r['mean_step_ms']:.3f}; runs {', '.join(f'{x:.3f}' for x in r['runs_step_ms'])})  "
                      f"phases: {phases}", flush=True)
    top = None
    if args.profile:
        top = profile("buffers", max(batches), args.tokens)
        print(f"top functions (own time, buffers path, batch {max(batches)}, cProfile):")
        for row in top:
            print(f"  {row['ms_per_step']:8.4f} ms/step {row['calls']:8} calls  {row['function']}")

    def main_case(work: str, key: str):
        return results.get(work, {}).get("buffers", {}).get("128", {}).get(key)

    print(json.dumps({
        "step_ms": main_case("uniform", "step_ms"), "ragged_mean_step_ms": main_case("ragged", "mean_step_ms"),
        "timed": "host time per decode step (model step stubbed: " + STUB[1] + "), median over decode steps, "
                 "median over repeats",
        "workloads": results, "tokens": args.tokens, "group": GROUP, "prompt_tokens": PROMPT_TOKENS,
        "model": "micro", "repeats": args.repeats, "threads": args.threads, "cpu": cpu, "top_functions": top}))


if __name__ == "__main__":
    main()
