"""Learning speed, ours vs TRL's GRPOTrainer, from the same SFT checkpoint, side by side in one run.

The peer (../shared/peers/trl_grpo_learning.py): a tiny DeepseekV3 (tiny_setup.py's config and character
tokenizer) SFT-ed on 2-digit addition with a digit-by-digit trace, then GRPO with 8 prompts x 8 completions x
<= 64 tokens a step, reward 1 when "<answer>{a+b}</answer>" is in the completion.

1. SFT: one checkpoint for both, made by `grpo sft` with the peer's stage-1 recipe (its tokenizer, config,
   trace format, 64 examples a step, AdamW lr 3e-3 constant, --sft-steps steps). Prompts carry no BOS, as the
   peer's trainer and evaluator feed them.
2. TRL: the peer script from that checkpoint (--sft-checkpoint), its own settings; it reports its GRPO wall
   time (trainer construction included) and its final pass@1.
3. Ours: `grpo train` from the same checkpoint, on the peer's prompts and reward, the same completions per
   step (8 x 8, <= 64 tokens, temperature 1); our own optimizer settings (below). A checkpoint every
   --save-every steps; `time/elapsed_s` (trainer construction included) dates each one.
4. Every checkpoint, and the SFT one, is scored by the peer's own `pass_at_1` (transformers' generate, 96
   held-out problems x 4 samples at temperature 1, seed 99), so both trainers are judged by one evaluator.

    python bench/learning.py [--sft-steps 400] [--trl-steps 100] [--ours-steps 120] [--out DIR]

Needs trl and ../shared/peers. Last line: one JSON object with trl_grpo_s, trl_pass1, ours_s_to_trl_pass1,
ours_pass1_at_trl_time, the SFT pass@1 and our curve."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"

REWARD = '''
def accuracy(completions, answer, **kw):
    """The peer's reward, word for word: 1 when the gold answer is in <answer> tags."""
    return [1.0 if f"<answer>{a}</answer>" in c else 0.0 for c, a in zip(completions, answer)]
'''

# Our GRPO settings: the peer's work per step (8 prompts x 8 completions x <= 64 tokens, temperature 1, beta 0),
# our choice of loss and optimizer.
OURS = ["prompts_per_step=8", "sampling.num_generations=8", "sampling.max_completion_length=64",
        "sampling.temperature=1.0", "algorithm.beta=0.0", "algorithm.loss_type=dapo", "algorithm.epsilon=0.2",
        "algorithm.epsilon_high=0.28", "optim.micro_batch_size=64", "optim.max_grad_norm=1.0"]


def write_data(out: Path, trace, problems) -> tuple[Path, Path]:
    """SFT rows (the peer's stage-1 distribution) and GRPO prompts (the peer's training problems)."""
    rng = random.Random(1)
    sft_rows = []
    for _ in range(25_600):  # 400 steps x 64, drawn like the peer's per-step draws
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        sft_rows.append({"prompt": f"{a}+{b}=", "completion": trace(a, b)})
    sft_path, grpo_path = out / "sft.jsonl", out / "grpo.jsonl"
    sft_path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    grpo_path.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                 for a, b in problems(8192, seed=7)))
    return sft_path, grpo_path


def run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - t


def score(checkpoint: Path, char_tokenizer, pass_at_1) -> float:
    """The peer's held-out pass@1 of a checkpoint, loaded by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    return pass_at_1(model, char_tokenizer())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--trl-steps", type=int, default=100)
    ap.add_argument("--ours-steps", type=int, default=150)
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1.5e-4, help="our GRPO learning rate (constant)")
    ap.add_argument("--extra", nargs="*", default=[], help="more recipe overrides for our run")
    ap.add_argument("--sft-checkpoint", help="skip stage 1: a checkpoint made by an earlier run")
    ap.add_argument("--skip-trl", help="JSON of an earlier TRL result (trl_grpo_s, trl_pass1) instead of running it")
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="learning_"))
    args = ap.parse_args()
    if not (PEERS / "trl_grpo_learning.py").exists():
        sys.exit(f"the peer is not here: {PEERS / 'trl_grpo_learning.py'} (bench/learning.py needs ../shared/peers)")
    sys.path.insert(0, str(PEERS))
    from tiny_setup import char_tokenizer
    from trl_grpo_learning import pass_at_1, problems, trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sft_data, grpo_data = write_data(out, trace, problems)
    (out / "peer_reward.py").write_text(REWARD)
    tok = char_tokenizer()
    tok.bos_token = None  # the peer feeds no BOS; ours adds the tokenizer's BOS when it has one
    tok.save_pretrained(out / "tokenizer")
    base = out / "base.yaml"  # every setting comes from the overrides below
    base.write_text("{}\n")
    grpo = [sys.executable, "-m", "grpo"]
    result: dict = {}

    # 1. One SFT checkpoint for both.
    if args.sft_checkpoint:
        sft_ckpt = Path(args.sft_checkpoint)
    else:
        sft_ckpt = out / "sft" / "model"
        result["sft_s"] = round(run(grpo + [
            "sft", str(base), f"output_dir={out}", "model.preset=tiny", f"model.tokenizer={out / 'tokenizer'}",
            f"data.source={sft_data}", "data.template='{prompt}'", f"sft.steps={args.sft_steps}", "sft.batch_size=64",
            "sft.lr=3e-3", "sft.warmup_steps=0", "sft.schedule=constant", "optim.weight_decay=0.0",
            "logging.progress_bar=false", "logging.tensorboard=false"], out / "sft.log"), 1)
    result["sft_pass1"] = score(sft_ckpt, char_tokenizer, pass_at_1)
    print("SFT checkpoint:", sft_ckpt, "pass@1", result["sft_pass1"], flush=True)

    # 2. TRL from it.
    if args.skip_trl:
        trl = json.loads(Path(args.skip_trl).read_text())
    else:
        run([sys.executable, str(PEERS / "trl_grpo_learning.py"), "--sft-checkpoint", str(sft_ckpt),
             "--grpo-steps", str(args.trl_steps), "--out", str(out / "trl")], out / "trl.log")
        trl = json.loads((out / "trl.log").read_text().strip().splitlines()[-1])
        (out / "trl_result.json").write_text(json.dumps(trl))
    result["trl_grpo_s"], result["trl_pass1"] = trl["grpo_s"], trl["grpo_pass1"]
    result["trl_steps"] = trl.get("grpo_steps", args.trl_steps)
    print("TRL:", trl, flush=True)

    # 3. Ours from it.
    run_dir = out / "ours"
    run(grpo + ["train", str(base), f"output_dir={run_dir}", f"max_steps={args.ours_steps}", "seed=0",
                f"model.path={sft_ckpt}", f"data.source={grpo_data}", "data.template='{prompt}'",
                f"rewards=[{{name: '{out / 'peer_reward.py'}:accuracy'}}]", f"optim.lr={args.lr}",
                f"logging.save_every={args.save_every}", "logging.keep_last=1000", "logging.tensorboard=false",
                "logging.progress_bar=false", *OURS, *args.extra], out / "ours.log")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = {m["step"]: m["time/elapsed_s"] for m in metrics}

    # 4. One evaluator for every checkpoint.
    curve = [{"step": 0, "elapsed_s": 0.0, "pass1": result["sft_pass1"]}]
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        curve.append({"step": step, "elapsed_s": round(elapsed[step], 1),
                      "pass1": score(ckpt / "model", char_tokenizer, pass_at_1)})
        print("ours", curve[-1], flush=True)
    reached = [c["elapsed_s"] for c in curve if c["pass1"] >= result["trl_pass1"]]
    within = [c["pass1"] for c in curve if c["elapsed_s"] <= result["trl_grpo_s"]]
    result.update({
        "ours_s_to_trl_pass1": reached[0] if reached else None,
        "ours_pass1_at_trl_time": within[-1],
        "ours_steps_at_trl_time": max(c["step"] for c in curve if c["elapsed_s"] <= result["trl_grpo_s"]),
        "ours_s_per_step": round(sum(m["time/step_s"] for m in metrics) / len(metrics), 3),
        "trl_s_per_step": round(result["trl_grpo_s"] / result["trl_steps"], 3),
        "ours_lr": args.lr, "ours_curve": curve,
    })
    result["half_trl_time_target_met"] = bool(reached) and reached[0] <= result["trl_grpo_s"] / 2
    result["higher_at_trl_time_target_met"] = result["ours_pass1_at_trl_time"] > result["trl_pass1"]
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("WANDB_DISABLED", "true")
    main()
