"""One GRPO step, ours vs TRL's GRPOTrainer, side by side in one run.

Same tiny DeepseekV3 config and character tokenizer (../shared/peers/tiny_setup.py), same work: 4 prompts x
8 completions x up to N tokens (N = 32, then 128), beta 0.04 (a reference forward), lr 1e-4, one optimizer
update per step. Each trainer runs in its own process (its own peak RSS); the median step time after a
warm-up step is reported, with where our step's time goes. With `--repeats N` every runner runs N times,
the runners taking turns within each repeat (so a machine that speeds up or slows down over the run moves
them alike): each figure is the median over the repeats, and `spread` lists the repeats' own ratios.

    python bench/grpo_step.py [--steps 6] [--threads 2] [--repeats 3]

"ours" runs the trainer as a recipe starts by default; "ours-compiled" with `rollout.compile=true` (decode
steps through graphs compiled ahead of time, before the first step) and `optim.compile=true` (the blocks
under torch.compile for the log-prob forwards and the update, compiled during the first step, which the
median leaves out); "ours-compiled-bf16" also with `rollout.dtype=bfloat16` (the compiled engine decoding a
bfloat16 copy of the float32 policy: the lever on CPUs that multiply bfloat16 natively, AMX or AVX-512 BF16;
its rollout/trainer log-prob mismatch is reported beside it, `mismatch`).

Needs `trl` (`pip install -e ".[bench]"`) and ../shared/peers for TRL's side. A peer that is missing or
fails is reported as null with its reason (`failed` in the JSON) and ours still runs; `--fail-peer trl`
makes TRL fail on purpose, to check that. The JSON names the CPU (bench/machine.py) and the threads.
Last line: one JSON object; top-level figures are for the 32-token workload."""

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
PEERS = Path(os.environ.get("R1_PEERS") or ROOT.parent / "shared" / "peers")  # R1_PEERS: a copy elsewhere (a GPU machine)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
FAIL_ENV = "R1_BENCH_FAIL"  # set in a child by --fail-peer: it raises before doing anything
RUNNERS = ("trl", "ours", "ours-compiled", "ours-compiled-bf16")
OURS = RUNNERS[1:]

REWARD = '''
def exact(prompts, completions, answer, **kw):
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
'''


def run_ours(ckpt: str, tokens: int, steps: int, workdir: str, compiled: bool = False, device: str = "cpu",
             rollout_dtype: str = "auto") -> dict:
    from grpo.config import load_recipe
    from grpo.trainer import GRPOTrainer

    Path(workdir, "reward.py").write_text(REWARD)
    rows = Path(workdir, "prompts.jsonl")
    sys.path.insert(0, str(PEERS))
    from tiny_setup import addition_prompts

    rows.write_text("\n".join(json.dumps(r) for r in addition_prompts(256)))
    recipe = load_recipe(None, [
        f"output_dir={workdir}/run", f"max_steps={steps}", "prompts_per_step=4", f"model.path={ckpt}",
        f"data.source={rows}", "data.template='{prompt}'", f"rewards=[{{name: '{workdir}/reward.py:exact'}}]",
        "sampling.num_generations=8", f"sampling.max_completion_length={tokens}", "algorithm.beta=0.04",
        "optim.lr=1e-4", "optim.micro_batch_size=32", "logging.save_every=100000", "logging.tensorboard=false",
        "logging.progress_bar=false", f"rollout.compile={str(compiled).lower()}", f"optim.compile={str(compiled).lower()}",
        f"rollout.dtype={rollout_dtype}",
        *([f"device={device}"] if device != "cpu" else [])])
    trainer = GRPOTrainer(recipe)
    history = trainer.train()
    keep = history[1:] or history
    med = {k: statistics.median(h[k] for h in keep) for k in ("time/step_s", "time/rollout_s",
                                                                "time/ref_old_logprobs_s", "time/update_s")}
    return {"s_per_step": med["time/step_s"], "rollout_s": med["time/rollout_s"],
            "ref_logprobs_s": med["time/ref_old_logprobs_s"], "update_s": med["time/update_s"],
            "mean_completion_length": statistics.median(h["completions/mean_length"] for h in keep),
            "mismatch": statistics.median(h["rollout/logprob_abs_diff"] for h in keep)}  # mean |rollout - trainer|


def run_trl(ckpt: str, tokens: int, steps: int, workdir: str, device: str = "cpu") -> dict:
    os.environ.setdefault("WANDB_DISABLED", "true")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(PEERS))
    from tiny_setup import addition_prompts

    def exact(completions, answer, **kw):
        return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.last = [], None

        def on_step_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.t.append(time.perf_counter() - self.last)

    torch.manual_seed(0)
    cfg = GRPOConfig(output_dir=f"{workdir}/trl", per_device_train_batch_size=32, num_generations=8,
                     max_completion_length=tokens, max_steps=steps, learning_rate=1e-4, beta=0.04, logging_steps=1,
                     report_to=[], use_cpu=device == "cpu", bf16=device != "cpu", save_strategy="no", temperature=1.0,
                     disable_tqdm=True)  # on a GPU bf16 autocast over float32 weights, as our trainer there
    timer = Timer()
    trainer = GRPOTrainer(model=ckpt, reward_funcs=exact, args=cfg, train_dataset=Dataset.from_list(addition_prompts(256)),
                          processing_class=AutoTokenizer.from_pretrained(ckpt), callbacks=[timer])
    trainer.train()
    keep = timer.t[1:] or timer.t
    return {"s_per_step": statistics.median(keep)}


def trl_missing() -> str | None:
    """Why TRL's side cannot run here, or None."""
    import importlib.util

    if not PEERS.exists():
        return f"the peer scripts are not at {PEERS}"
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install -e '.[bench]')"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each runner, taking turns (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="32,128", help="comma-separated completion lengths (default %(default)s)")
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated, of {', '.join(RUNNERS)}")
    ap.add_argument("--fail-peer", action="append", default=[], choices=["trl"], help="make TRL fail on purpose")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both trainers run (default %(default)s)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        which, ckpt, tokens, workdir = args.child
        if os.environ.get(FAIL_ENV):
            raise RuntimeError(f"{which} made to fail by --fail-peer")
        torch.set_num_threads(args.threads)
        if which == "trl":
            out = run_trl(ckpt, int(tokens), args.steps, workdir, device=args.device)
        else:
            out = run_ours(ckpt, int(tokens), args.steps, workdir, compiled=which.startswith("ours-compiled"),
                           device=args.device, rollout_dtype="bfloat16" if which.endswith("bf16") else "auto")
        if args.device != "cpu":
            out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 1e6
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    from machine import cpu_info, describe
    from rollout import failure_reason

    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if sorted(set(runners) - set(RUNNERS)):
        ap.error(f"--runners: choose from {', '.join(RUNNERS)}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    failed: dict[str, str] = {}
    if "trl" in runners and trl_missing():
        failed["trl"] = trl_missing()
    cpu = cpu_info(args.threads)
    print(f"CPU: {describe(cpu)}, {args.threads} threads", flush=True)
    sys.path.insert(0, str(PEERS))
    runs: dict[str, list[dict]] = {}  # "<runner>_<tokens>": one result per repeat
    with tempfile.TemporaryDirectory() as tmp:
        from model import build_model
        from model.config import ModelConfig

        if PEERS.exists():
            from tiny_setup import char_tokenizer, tiny_config

            tok = char_tokenizer()
            cfg = ModelConfig.from_hf_dict(tiny_config(len(tok)).to_dict())
        else:
            from model.presets import preset_config
            from model.tokenizer import build_char_tokenizer

            tok = build_char_tokenizer()
            cfg = preset_config("tiny", vocab_size=len(tok))
        ckpt = f"{tmp}/ckpt"
        build_model(cfg, seed=0).save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        for repeat, tokens, which in ((r, t, w) for r in range(args.repeats) for t in token_counts for w in runners):
            if which in failed:
                continue
            work = Path(tmp, f"{which}-{tokens}-{repeat}")
            work.mkdir()
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device,
                   "--child", which, ckpt, str(tokens), str(work)]
            fail = {FAIL_ENV: "1"} if which in args.fail_peer else {}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, **fail,  # keeps a PYTHONPATH of carried wheels
                                       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
            if proc.returncode != 0:
                failed[which] = failure_reason(proc.stderr)
                print(f"{which} failed at {tokens} tokens: {failed[which]}", file=sys.stderr, flush=True)
                continue
            runs.setdefault(f"{which}_{tokens}", []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    spread = {f"{which}_{tokens}": [round(t["s_per_step"] / o["s_per_step"], 2)
                                    for t, o in zip(runs[f"trl_{tokens}"], runs[f"{which}_{tokens}"])]
              for tokens in token_counts for which in OURS
              if f"trl_{tokens}" in runs and f"{which}_{tokens}" in runs}
    for tokens in token_counts:
        t = results.get(f"trl_{tokens}")
        for which in OURS:
            o = results.get(f"{which}_{tokens}")
            if o is None:
                continue
            line = f"{tokens:4d} tokens: {which} {o['s_per_step']:.3f} s/step ({o['peak_rss_mb']:.0f} MB)"
            if t:
                line += (f", TRL {t['s_per_step']:.3f} s/step ({t['peak_rss_mb']:.0f} MB), "
                         f"{t['s_per_step'] / o['s_per_step']:.2f}x")
            if len(spread.get(f"{which}_{tokens}", ())) > 1:
                line += f" (repeats: {', '.join(f'{x:.2f}x' for x in spread[f'{which}_{tokens}'])})"
            print(line)
            print(f"      {which}: rollout {o['rollout_s']:.3f} s, reference log-probs {o['ref_logprobs_s']:.3f} s, "
                  f"update {o['update_s']:.3f} s; mean completion {o['mean_completion_length']:.0f} tokens; "
                  f"log-prob mismatch {o['mismatch']:.2g}")
    for which, why in failed.items():
        print(f"{which}: not measured: {why}")
    first = token_counts[0]
    o, t, c, cb = (results.get(f"{w}_{first}") for w in ("ours", "trl", "ours-compiled", "ours-compiled-bf16"))

    def get(r: dict | None, key: str) -> float | None:
        return round(r[key], 4) if r else None

    def ratio(peer: dict | None, mine: dict | None) -> float | None:
        return round(peer["s_per_step"] / mine["s_per_step"], 2) if peer and mine else None

    print(json.dumps({
        "tokens": first, "ours_s_per_step": get(o, "s_per_step"), "trl_s_per_step": get(t, "s_per_step"),
        "ours_peak_rss_mb": get(o, "peak_rss_mb"), "trl_peak_rss_mb": get(t, "peak_rss_mb"),
        "speedup": ratio(t, o), "ours_compiled_s_per_step": get(c, "s_per_step"),
        "ours_compiled_peak_rss_mb": get(c, "peak_rss_mb"), "compiled_speedup": ratio(t, c),
        "compiled_bf16_speedup": ratio(t, cb),
        "failed": failed, "results": results, "spread": spread, "cpu": cpu, "device": args.device,
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
