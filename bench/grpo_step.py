"""One GRPO step, ours vs TRL's GRPOTrainer, side by side in one run.

Same tiny DeepseekV3 config and character tokenizer (../shared/peers/tiny_setup.py), same work: 4 prompts x
8 completions x up to N tokens (N = 32, then 128), beta 0.04 (a reference forward), lr 1e-4, one optimizer
update per step. Each trainer runs in its own process (its own peak RSS); the median step time after a
warm-up step is reported, with where our step's time goes.

    python bench/grpo_step.py [--steps 6] [--threads 2]

"ours" runs the trainer as a recipe starts by default; "ours-compiled" with `rollout.compile=true` (decode
steps through graphs compiled ahead of time, before the first step) and `optim.compile=true` (the blocks
under torch.compile for the log-prob forwards and the update, compiled during the first step, which the
median leaves out).

Needs `trl` (pip install trl) and ../shared/peers for TRL's side; without them only ours runs.
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
PEERS = ROOT.parent / "shared" / "peers"
sys.path.insert(0, str(ROOT))

REWARD = '''
def exact(prompts, completions, answer, **kw):
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]
'''


def run_ours(ckpt: str, tokens: int, steps: int, workdir: str, compiled: bool = False) -> dict:
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
        "logging.progress_bar=false", f"rollout.compile={str(compiled).lower()}", f"optim.compile={str(compiled).lower()}"])
    trainer = GRPOTrainer(recipe)
    history = trainer.train()
    keep = history[1:] or history
    med = {k: statistics.median(h[k] for h in keep) for k in ("time/step_s", "time/rollout_s",
                                                                "time/ref_old_logprobs_s", "time/update_s")}
    return {"s_per_step": med["time/step_s"], "rollout_s": med["time/rollout_s"],
            "ref_logprobs_s": med["time/ref_old_logprobs_s"], "update_s": med["time/update_s"],
            "mean_completion_length": statistics.median(h["completions/mean_length"] for h in keep)}


def run_trl(ckpt: str, tokens: int, steps: int, workdir: str) -> dict:
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
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", temperature=1.0, disable_tqdm=True)
    timer = Timer()
    trainer = GRPOTrainer(model=ckpt, reward_funcs=exact, args=cfg, train_dataset=Dataset.from_list(addition_prompts(256)),
                          processing_class=AutoTokenizer.from_pretrained(ckpt), callbacks=[timer])
    trainer.train()
    keep = timer.t[1:] or timer.t
    return {"s_per_step": statistics.median(keep)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        which, ckpt, tokens, workdir = args.child
        if which == "trl":
            out = run_trl(ckpt, int(tokens), args.steps, workdir)
        else:
            out = run_ours(ckpt, int(tokens), args.steps, workdir, compiled=which == "ours-compiled")
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    have_trl = PEERS.exists()
    try:
        import trl  # noqa: F401
    except ImportError:
        have_trl = False
    sys.path.insert(0, str(PEERS))
    results: dict[str, dict] = {}
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
        for tokens in (32, 128):
            for which in (["trl"] if have_trl else []) + ["ours", "ours-compiled"]:
                work = Path(tmp, f"{which}-{tokens}")
                work.mkdir()
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                       "--child", which, ckpt, str(tokens), str(work)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
                if proc.returncode != 0:
                    raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
                results[f"{which}_{tokens}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    for tokens in (32, 128):
        t = results.get(f"trl_{tokens}")
        for which in ("ours", "ours-compiled"):
            o = results[f"{which}_{tokens}"]
            line = f"{tokens:4d} tokens: {which} {o['s_per_step']:.3f} s/step ({o['peak_rss_mb']:.0f} MB)"
            if t:
                line += (f", TRL {t['s_per_step']:.3f} s/step ({t['peak_rss_mb']:.0f} MB), "
                         f"{t['s_per_step'] / o['s_per_step']:.2f}x")
            print(line)
            print(f"      {which}: rollout {o['rollout_s']:.3f} s, reference log-probs {o['ref_logprobs_s']:.3f} s, "
                  f"update {o['update_s']:.3f} s; mean completion {o['mean_completion_length']:.0f} tokens")
    o32, t32, c32 = results["ours_32"], results.get("trl_32"), results["ours-compiled_32"]
    print(json.dumps({
        "ours_s_per_step": round(o32["s_per_step"], 4), "trl_s_per_step": round(t32["s_per_step"], 4) if t32 else None,
        "ours_peak_rss_mb": round(o32["peak_rss_mb"], 1), "trl_peak_rss_mb": round(t32["peak_rss_mb"], 1) if t32 else None,
        "speedup": round(t32["s_per_step"] / o32["s_per_step"], 2) if t32 else None,
        "ours_compiled_s_per_step": round(c32["s_per_step"], 4),
        "compiled_speedup": round(t32["s_per_step"] / c32["s_per_step"], 2) if t32 else None,
        "results": results, "steps": args.steps, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
