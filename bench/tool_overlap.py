"""Tool episodes with and without `tools.overlap`: the wall time of one rollout of tool-using episodes, the
engine waiting for each step's calls (the default) against the others decoding while calls run.

What is timed: `generate_episodes` on the `tiny` preset (random init, character tokenizer), P prompts x 8
samples (temperature 1, seeded, EOS ignored) of up to --tokens tokens, up to --calls tool calls each. A random
policy writes no call syntax, so the toolbox makes one: a turn's call is complete once it holds k characters,
k between --every/2 and 3*--every/2 by the turn's own text, so calls fall at different steps for different
samples, as they do for a trained policy. Each call is either "wait" (a function sleeping 0.5-1.5 x --tool-ms,
by the call's text: an API or a remote sandbox) or, with --python, our sandboxed python tool running a
one-line program (a local sandbox: a process start per call, on this machine's cores, beside the decode).
Both modes see the same calls and durations; the repeats alternate between them. `same_completions`: whether
both gave the same tokens (the engine's logits do not depend on the batch here).

    python bench/tool_overlap.py [--prompts 4] [--tokens 96] [--every 24] [--calls 3] [--tool-ms 100]
                                 [--workers 4] [--python] [--repeats 3] [--threads 2]

Last line: one JSON object; `speedup` is the median wall time waiting over the median overlapped."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from grpo.rollout import SamplingParams  # noqa: E402
from grpo.rollout.engine import Engine  # noqa: E402
from grpo.rollout.episodes import ToolCall, generate_episodes  # noqa: E402
from grpo.tools import Toolbox  # noqa: E402
from model import build_model  # noqa: E402
from model.presets import preset_config  # noqa: E402
from model.tokenizer import build_char_tokenizer  # noqa: E402


def wait(ms: float) -> str:
    """Sleeps `ms` milliseconds: a tool whose time is spent elsewhere (an API, a remote sandbox)."""
    time.sleep(ms / 1000)
    return "ok"


class StaggeredCalls(Toolbox):
    """A call once a turn holds k characters, k in [every/2, 3*every/2) by the turn's first characters."""

    def __init__(self, every: int, tool_ms: float, python: bool, workers: int):
        super().__init__(["python"] if python else [wait], max_workers=workers, timeout_s=30)
        self.every, self.tool_ms, self.python = every, tool_ms, python

    def find_call(self, text: str) -> ToolCall | None:
        h = sum(ord(c) * (i + 1) for i, c in enumerate(text[:6]))
        if len(text) < self.every // 2 + h % self.every:
            return None
        if self.python:
            return ToolCall("python", f"print({len(text)} * 11)")
        return ToolCall("wait", {"ms": self.tool_ms * (0.5 + (h % 101) / 100)})

    def render(self, call: ToolCall, result) -> str:
        return f"={result.output.strip()[:6]};"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--every", type=int, default=24)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--tool-ms", type=float, default=100.0)
    ap.add_argument("--workers", type=int, default=4, help="calls running at once (tools.max_workers)")
    ap.add_argument("--python", action="store_true", help="the sandboxed python tool instead of 'wait'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from machine import cpu_info, describe

    cpu = cpu_info(args.threads)
    print(f"CPU: {describe(cpu)}", flush=True)
    tok = build_char_tokenizer()
    model = build_model(preset_config("tiny", vocab_size=len(tok)), seed=0).eval()
    prompts = [tok.encode(f"{17 * i + 10}+{31 * i + 7}=") for i in range(args.prompts)]
    params = [SamplingParams(n=8, max_tokens=args.tokens, seed=i, ignore_eos=True) for i in range(args.prompts)]
    box = StaggeredCalls(args.every, args.tool_ms, args.python, args.workers)
    engine = Engine(model, tok)
    generate_episodes(engine, prompts, params, box, args.calls)  # warm-up
    runs: dict[bool, list[dict]] = {False: [], True: []}
    tokens: dict[bool, list] = {}
    for _ in range(args.repeats):
        for overlap in (False, True):
            start = time.perf_counter()
            outs, stats = generate_episodes(engine, prompts, params, box, args.calls, overlap=overlap)
            wall = time.perf_counter() - start
            completions = [c for o in outs for c in o.completions]
            tokens[overlap] = [c.token_ids for c in completions]
            runs[overlap].append({"wall_s": wall, "tool_wait_s": stats["tool_seconds"],
                                  "steps_beside_tools": stats["steps_beside_tools"],
                                  "calls": sum(len(c.tool_calls) for c in completions),
                                  "call_seconds": sum(x["seconds"] for c in completions for x in c.tool_calls)})
    med = {overlap: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for overlap, rs in runs.items()}
    for overlap, name in ((False, "waiting"), (True, "overlap")):
        m = med[overlap]
        print(f"{name:8s}: {m['wall_s']:.3f} s wall, {m['tool_wait_s']:.3f} s waiting for tools, "
              f"{m['calls']:.0f} calls ({m['call_seconds']:.2f} s of calls), {m['steps_beside_tools']:.0f} steps "
              f"beside a call")
    speedup = med[False]["wall_s"] / med[True]["wall_s"]
    print(f"overlap: {speedup:.2f}x the waiting engine's speed")
    print(json.dumps({"speedup": round(speedup, 3), "waiting": med[False], "overlap": med[True],
                      "runs_wall_s": {"waiting": [r["wall_s"] for r in runs[False]],
                                      "overlap": [r["wall_s"] for r in runs[True]]},
                      "same_completions": tokens[False] == tokens[True],
                      "tool": "python" if args.python else f"wait {args.tool_ms:g} ms (0.5-1.5x)",
                      "workload": {"prompts": args.prompts, "samples": 8, "tokens": args.tokens, "every": args.every,
                                   "calls": args.calls, "workers": args.workers},
                      "cpu": cpu, "threads": args.threads, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
