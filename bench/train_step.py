"""Training-step throughput of our DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Same tiny config (../shared/peers/tiny_setup.py's: 256 wide, 4 layers, 8 routed experts top-2), same weights,
same batch (32 x 48 tokens), one forward + backward + AdamW step each (fused AdamW for all), alternated in one process and
repeated; medians reported. "ours-compiled" is our model with its blocks under torch.compile
(`CausalLM.compile_blocks`, `optim.compile: true` in a recipe); its compile falls in the warm-up steps.
Also the KV-cache bytes per token of each model.

    python bench/train_step.py [--steps 15] [--batch 32] [--seq 48] [--threads 2]

Last line: one JSON object with the figures."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import LatentCache, build_model, load_pretrained
from model.presets import preset_config

VOCAB = 50  # the peers' character tokenizer


def step_time(model, ids: torch.Tensor, opt: torch.optim.Optimizer, logits_fn) -> float:
    t0 = time.perf_counter()
    logits = logits_fn(model, ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = preset_config("tiny", vocab_size=VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(cfg, seed=0).save_pretrained(tmp)  # one set of weights for both
        ours = load_pretrained(tmp).train()
        ours_compiled = load_pretrained(tmp).train().compile_blocks()
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    runs = {"ours": (ours, lambda m, x: m(x)), "ours-compiled": (ours_compiled, lambda m, x: m(x)),
            "transformers": (theirs, lambda m, x: m(x).logits)}
    # AdamW as our trainer runs it (one fused kernel), the same for every model
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, (m, _) in runs.items()}
    ids = torch.randint(3, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.steps + 2):  # alternate so all see the same machine state; 2 warm-up steps (and the compile)
        for name, (model, fn) in runs.items():
            t = step_time(model, ids, opts[name], fn)
            if i >= 2:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    active = ours.num_parameters(active=True)
    gflops = 6 * active * tokens / med["ours"] / 1e9
    gflops_compiled = 6 * active * tokens / med["ours-compiled"] / 1e9

    # Cache bytes per token: ours holds the latent; transformers' DynamicCache holds what its layers store.
    our_cache = LatentCache(cfg, num_slots=1).bytes_per_token()
    with torch.no_grad():
        cache = DynamicCache(config=theirs.config)
        theirs(ids[:1, :8], past_key_values=cache, use_cache=True)
        their_cache = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                          for layer in cache.layers) // 8

    print(f"{'':14}{'s/step':>10}{'tokens/s':>12}")
    for k in runs:
        print(f"{k:14}{med[k]:10.3f}{tokens / med[k]:12.0f}")
    print(f"speed-up {med['transformers'] / med['ours']:.2f}x; ours {gflops:.1f} GFLOP/s "
          f"(6 x {active / 1e6:.2f}M active params x {tokens} tokens / step time)")
    print(f"compiled blocks (CausalLM.compile_blocks): speed-up {med['transformers'] / med['ours-compiled']:.2f}x, "
          f"{gflops_compiled:.1f} GFLOP/s")
    print(f"KV cache bytes/token: ours {our_cache}, transformers {their_cache} ({their_cache / our_cache:.1f}x)")
    print(json.dumps({
        "ours_tokens_per_s": round(tokens / med["ours"], 1),
        "transformers_tokens_per_s": round(tokens / med["transformers"], 1),
        "speedup": round(med["transformers"] / med["ours"], 3),
        "ours_s_per_step": round(med["ours"], 4), "transformers_s_per_step": round(med["transformers"], 4),
        "ours_gflops": round(gflops, 1),
        "ours_compiled_tokens_per_s": round(tokens / med["ours-compiled"], 1),
        "compiled_speedup": round(med["transformers"] / med["ours-compiled"], 3),
        "ours_compiled_s_per_step": round(med["ours-compiled"], 4), "ours_compiled_gflops": round(gflops_compiled, 1),
        "ours_cache_bytes_per_token": our_cache, "transformers_cache_bytes_per_token": their_cache,
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
