"""The R1 loop's parts on one device, checked and timed in one command: correctness against transformers and
against plain recompute loops, then speed against transformers (and TRL) on a DeepSeek-V2-Lite-shaped model.

    python bench/gpu.py                        # the first CUDA device, the full mode (a few minutes on an H200)
    python bench/gpu.py --device cpu --tiny    # every section on a tiny model: about a minute on 2 CPU cores

Sections (each guarded: one that fails is reported as null with its reason and the others still run):
- parity: our logits vs transformers' DeepseekV3 on the same weights: float32 max |diff| (bound 1e-4), and
  in bfloat16 each model's relative error against the float32 logits;
- greedy: the engine's greedy tokens vs a loop that recomputes the whole sequence for every token;
- logprobs: the log-probs the engine returns vs the trainer's recomputed ones (mean and max |diff|), in float32
  and bfloat16;
- rollout: tokens/s of our engine (CUDA graphs on a GPU) vs transformers `generate` (the same shapes, random
  init on the device, bfloat16; the V2-Lite-shaped model, or a tiny one with --tiny) at 16x8x256 and
  64x8x512, and the decode step's time (in the engine, and the graph's replay alone) against its memory
  floor (the bytes a step must read: weights + latent cache, over the bandwidth of a large copy);
- train: forward + backward tokens/s and MFU (6 x active params x tokens / time / measured bf16 matmul peak),
  ours vs transformers;
- kernels: each `model.kernels` entry's Triton path vs its PyTorch reference (bench/gpu_kernels.py);
- grpo: one GRPO step, ours vs TRL (bench/grpo_step.py's runners, on the CPU only until the trainer takes a
  device), where trl is installed; --tiny leaves it out unless --sections names it.

Runs under torch >= 2.11 and transformers >= 5.16.1. Last line: one JSON object naming the device."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model import CausalLM, LatentCache, build_model  # noqa: E402
from model.presets import preset_config  # noqa: E402

PARITY_BOUND = 1e-4  # float32 max |logit diff| ours vs transformers
SECTIONS = ("parity", "greedy", "logprobs", "rollout", "train", "kernels", "grpo")
# bench/grpo_step.py takes minutes on a CPU even at its smallest: --tiny leaves it out unless --sections names it.
TINY_LEAVES_OUT = ("grpo",)


# ----- the machine --------------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict:
    """{"type", "name", "torch", ...}: the GPU's name, memory, driver and CUDA version, or the CPU's."""
    info: dict = {"type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 1024**3, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", driver=None)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        from machine import cpu_info

        info.update(name=cpu_info()["model"], cpu=cpu_info())
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1, warmup: bool = True) -> float:
    """Seconds per call of fn (after one warm-up call unless told not), the device synchronized around the clock."""
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


_CEILINGS: dict[tuple[str, bool], tuple[float, float]] = {}


def ceilings(device: torch.device, tiny: bool) -> tuple[float, float]:
    """(copy bandwidth bytes/s, bf16 matmul FLOP/s), measured once per run."""
    key = (str(device), tiny)
    if key not in _CEILINGS:
        _CEILINGS[key] = (copy_bandwidth(device, tiny), matmul_peak(device, tiny))
    return _CEILINGS[key]


def copy_bandwidth(device: torch.device, tiny: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (64 if tiny else 2048) * 1024**2
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, repeats=5)
    return 2 * n / t


def matmul_peak(device: torch.device, tiny: bool) -> float:
    """FLOP/s of a large bfloat16 matmul: the peak MFU is measured against."""
    n = 512 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, device, repeats=3 if tiny else 20)
    return 2 * n**3 / t


def top_kernels(fn: Callable[[], object], device: torch.device, n: int = 12) -> list[dict] | None:
    """The n device kernels one call of fn spends most time in (name, total ms, calls), by torch.profiler;
    None on a CPU. Where the time goes, for the next optimization."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, "device_time_total", 0), reverse=True)[:n]
    return [{"kernel": e.key[:90], "ms": round(getattr(e, "device_time_total", 0) / 1e3, 3), "calls": e.count}
            for e in rows]


def host_profile(fn: Callable[[], object], steps: int, n: int = 12) -> list[dict]:
    """Where the host's time goes in one call of fn (cProfile, own time per function, ms per decode step):
    what the engine's Python costs beside the device's work."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": f"{Path(k[0]).name}:{k[1]}({k[2]})"[:80], "ms_per_step": round(v[2] * 1e3 / max(1, steps), 4),
             "calls": v[1]} for k, v in rows]


# ----- models -------------------------------------------------------------------------------------------------
def random_model(cfg, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """A randomly initialized model built straight on the device (no host copy of the weights)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    with torch.no_grad():
        model.init_weights()
    return model


def transformers_model(cfg, device: torch.device, dtype: torch.dtype):
    """transformers' model of the same config, randomly initialized on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = cfg.to_hf_dict()
    hf_cfg = AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)


def twin_models(cfg, device: torch.device, dtype: torch.dtype):
    """(ours, transformers') with the same weights, through a checkpoint on disk."""
    from transformers import AutoModelForCausalLM

    from model import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        build_model(cfg, seed=0).save_pretrained(tmp)
        ours = load_pretrained(tmp, dtype=dtype, device=device).eval()
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    return ours, theirs


def correctness_config(vocab: int):
    return preset_config("tiny", vocab_size=vocab)


# ----- correctness --------------------------------------------------------------------------------------------
def section_parity(device: torch.device, args) -> dict:
    cfg = correctness_config(256)
    ours, theirs = twin_models(cfg, device, torch.float32)
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = theirs(ids).logits.float()
        mine = ours(ids).float()
        diff = (mine - ref).abs().max().item()
        ours.to(torch.bfloat16)
        theirs.to(torch.bfloat16)
        ours.forget_derived_weights()
        rel_ours = ((ours(ids).float() - ref).norm() / ref.norm()).item()
        rel_theirs = ((theirs(ids).logits.float() - ref).norm() / ref.norm()).item()
    return {"fp32_max_abs_diff": diff, "fp32_bound": PARITY_BOUND, "fp32_ok": diff < PARITY_BOUND,
            "bf16_rel_error_ours": rel_ours, "bf16_rel_error_transformers": rel_theirs,
            "config": "tiny (256 wide, 4 layers, 8 routed experts top-2)", "tokens": list(ids.shape)}


def scaled_tiny(device: torch.device, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> CausalLM:
    """The tiny model; scale > 1 sharpens it, so greedy choices are clear-cut (no float-rounding ties)."""
    model = build_model(correctness_config(256), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model.to(device=device, dtype=dtype).eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34, 35]]


def section_greedy(device: torch.device, args) -> dict:
    from grpo.rollout import SamplingParams
    from grpo.rollout.engine import Engine

    model = scaled_tiny(device, scale=4.0)
    n = 8 if args.tiny else 32
    out = Engine(model, block_size=16, num_blocks=64).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    mismatches = 0
    with torch.no_grad():
        for prompt, o in zip(PROMPTS, out):
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
            mismatches += sum(a != b for a, b in zip(o.completions[0].token_ids, ids[len(prompt):]))
    return {"equal": mismatches == 0, "mismatched_tokens": mismatches, "tokens": n * len(PROMPTS)}


def logprob_diffs(model: CausalLM, device: torch.device, sampler: str, tokens: int) -> dict:
    from grpo.logprobs import token_logprobs
    from grpo.rollout import SamplingParams
    from grpo.rollout.engine import Engine

    T = 0.7
    out = Engine(model, block_size=16, num_blocks=128, sampler=sampler).generate(
        PROMPTS, SamplingParams(n=2, temperature=T, top_k=40, max_tokens=tokens, seed=0, ignore_eos=True))
    diffs = []
    with torch.no_grad():
        for prompt, o in zip(PROMPTS, out):
            for c in o.completions:
                ids = torch.tensor([prompt + c.token_ids], device=device)
                hidden = model.model.norm(model.hidden_states(ids))
                theirs = token_logprobs(hidden[:, len(prompt) - 1:-1], model.lm_head.weight,
                                        ids[:, len(prompt):], temperature=T)[0]
                diffs.append((torch.tensor(c.logprobs, device=device) - theirs.float()).abs())
    d = torch.cat(diffs)
    return {"mean_abs_diff": d.mean().item(), "max_abs_diff": d.max().item(), "tokens": d.numel()}


def section_logprobs(device: torch.device, args) -> dict:
    sampler = "counter" if device.type == "cuda" else "generator"
    tokens = 8 if args.tiny else 64
    return {"sampler": sampler, "float32": logprob_diffs(scaled_tiny(device), device, sampler, tokens),
            "bfloat16": logprob_diffs(scaled_tiny(device, torch.bfloat16), device, sampler, tokens)}


# ----- speed --------------------------------------------------------------------------------------------------
def speed_config(tiny: bool):
    if tiny:
        return preset_config("tiny-vllm", vocab_size=512), "tiny-vllm (256 wide, 4 layers, kv_lora_rank 512)"
    return preset_config("v2-lite-shaped", vocab_size=102400), "v2-lite-shaped (2048 wide, 4 layers, 64 experts top-6)"


def decode_floor_bytes(model: CausalLM, batch: int, context: int) -> int:
    """The bytes one decode step of `batch` sequences at `context` tokens must read: the weights every token
    uses, the routed experts the batch touches (expected distinct experts of top-K of E draws), the cache."""
    cfg = model.config
    elt = model.lm_head.weight.element_size()
    routed = 0
    expert_params = 0
    for m in model.moe_layers():
        per_expert = m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()
        expert_params += m.n_experts * per_expert
        touched = m.n_experts * (1 - (1 - m.top_k / m.n_experts) ** batch)
        routed += touched * per_expert
    embed = model.model.embed_tokens.weight.numel()
    dense = model.num_parameters() - expert_params - embed  # the embedding is a lookup: a row per token
    cache = LatentCache(cfg, num_slots=1).bytes_per_token() * batch * context
    return int((dense + routed) * elt + cache)


def rollout_workload(device: torch.device, cfg, prompts_n: int, n: int, new: int, peer_new: int,
                     tiny: bool) -> dict:
    """One workload: our engine (its device default: CUDA graphs on a GPU) vs transformers `generate`
    (sampling, the same weights' shapes) on prompts_n prompts x n samples x new tokens. The peer decodes
    peer_new tokens (fewer on the largest workload, so the script fits its minutes; per-token cost grows
    with context, so this favours the peer)."""
    from grpo.rollout import SamplingParams
    from grpo.rollout.engine import Engine

    prompt_len = 32
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(prompts_n)]
    result: dict = {"prompts": prompts_n, "n": n, "new_tokens": new, "prompt_tokens": prompt_len,
                    "dtype": "bfloat16" if device.type == "cuda" else "float32"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, device, dtype).eval()
    cache_bytes = (1 if tiny else 24) * 1024**3
    engine = Engine(model, cache_memory_bytes=cache_bytes, max_num_seqs=prompts_n * n)

    def ours(tokens: int) -> None:
        engine.generate(prompts, SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0))

    ours(4)  # warm-up (on a GPU: Triton compiles, the first graphs are captured)
    t_full = timed(lambda: ours(new), device, warmup=False)
    steps_full = engine.last_stats["steps"]
    t_half = timed(lambda: ours(new // 2), device, warmup=False)
    steps_half = engine.last_stats["steps"]
    result.update(ours_tokens_per_s=prompts_n * n * new / t_full, ours_seconds=t_full, decode_path=engine.decode_path,
                  sampler=engine.sampler)
    result["host_top_functions"] = host_profile(lambda: ours(new // 4), steps=new // 4)
    step = (t_full - t_half) / max(1, steps_full - steps_half)
    bw, _ = ceilings(device, tiny)
    batch = prompts_n * n
    floor_bytes = decode_floor_bytes(model, batch, prompt_len + 3 * new // 4)
    decode = {"step_s": step, "batch": batch, "floor_bytes": floor_bytes, "copy_bandwidth_gb_s": bw / 1e9,
              "floor_s": floor_bytes / bw, "step_over_floor": step / (floor_bytes / bw)}
    graphs = engine.runner.decode_graphs
    if graphs is not None:  # the captured step alone, without the engine's Python around it
        from grpo.rollout.cuda_graphs import padded_size

        captured = graphs.captured(batch)
        if captured is not None:
            graph, sampled = captured
            decode["graph_replay_s"] = timed(graph.replay, device, repeats=20)
            decode["graph_replay_over_floor"] = decode["graph_replay_s"] / decode["floor_s"]
            decode["graph_samples"] = sampled
            decode["graphs_captured"] = graphs.captures
            decode["eager_step_top_kernels"] = top_kernels(lambda: graphs._step(padded_size(batch), sampled), device)
    result["decode"] = decode
    result["overlap"] = overlap_rollout(engine, model, prompts, n, new, device, cache_bytes)
    engine = model = graphs = None  # free the device memory for the peer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        theirs = transformers_model(cfg, device, dtype).eval()
        ids = torch.tensor([p for p in prompts for _ in range(n)], device=device)

        def go(tokens: int) -> None:
            with torch.no_grad():
                theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                min_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)

        go(2)  # warm-up
        t = timed(lambda: go(peer_new), device, warmup=False)
        result.update(transformers_new_tokens=peer_new, transformers_tokens_per_s=batch * peer_new / t)
        result["speedup"] = result["ours_tokens_per_s"] / result["transformers_tokens_per_s"]
    except Exception as e:  # the peer failing leaves our figures standing
        result["transformers_tokens_per_s"] = None
        result["transformers_error"] = f"{type(e).__name__}: {e}"[:400]
    return result


def overlap_rollout(engine, model: CausalLM, prompts: list[list[int]], n: int, new: int, device: torch.device,
                    cache_bytes: int) -> dict:
    """The same rollout step by step and with `Engine(overlap=True)` (each decode step launched before the last
    one's tokens are read), side by side on one engine: tokens/s of both, and whether the completions are the
    same. Where the engine decodes eagerly (a CPU), an engine on the buffered path with the counter sampler
    stands in, which is what overlap needs; nothing runs asynchronously there, so only the equality tells."""
    from grpo.rollout import SamplingParams
    from grpo.rollout.engine import Engine

    if engine.sampler != "counter" or engine.decode_path == "eager":
        engine = Engine(model, cache_memory_bytes=cache_bytes, max_num_seqs=len(prompts) * n, decode_path="buffers",
                        sampler="counter")
    # Sequences end at EOS here (with ignore_eos every step would run every row), so steps run for nothing too.
    params = SamplingParams(n=n, temperature=1.0, max_tokens=new, seed=1)
    outputs: dict[bool, list[list[int]]] = {}
    seconds: dict[bool, float] = {}
    for overlap in (False, True, False, True):  # interleaved; the first of each warms up
        engine.overlap = overlap
        sync(device)
        t0 = time.perf_counter()
        out = engine.generate(prompts, params)
        sync(device)
        seconds[overlap] = time.perf_counter() - t0
        outputs[overlap] = [c.token_ids for o in out for c in o.completions]
    engine.overlap = False
    tokens = sum(map(len, outputs[False]))
    return {"decode_path": engine.decode_path, "tokens": tokens, "step_by_step_tokens_per_s": tokens / seconds[False],
            "overlap_tokens_per_s": sum(map(len, outputs[True])) / seconds[True],
            "overlap_speedup": seconds[False] / seconds[True], "same_completions": outputs[True] == outputs[False]}


def section_rollout(device: torch.device, args) -> dict:
    cfg, name = speed_config(args.tiny)
    workloads = [(2, 4, 8, 8)] if args.tiny else [(16, 8, 256, 256), (64, 8, 512, 64)]
    result: dict = {"model": name}
    for prompts_n, n, new, peer_new in workloads:
        key = f"{prompts_n}x{n}x{new}"
        try:
            result[key] = rollout_workload(device, cfg, prompts_n, n, new, peer_new, args.tiny)
        except Exception as e:
            traceback.print_exc()
            result[key] = {"error": f"{type(e).__name__}: {e}"[:600]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def section_kernels(device: torch.device, args) -> dict:
    from gpu_kernels import section_kernels as run

    bw, peak = ceilings(device, args.tiny)
    return run(device, args, bw, peak, speed_config(args.tiny)[0])


def section_train(device: torch.device, args) -> dict:
    cfg, name = speed_config(args.tiny)
    batch, seq = (2, 64) if args.tiny else (8, 1024)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    _, peak = ceilings(device, args.tiny)

    def step_of(model, logits_fn) -> Callable[[], None]:
        def step() -> None:
            logits = logits_fn(model, ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    ours = random_model(cfg, device, torch.bfloat16).train()
    active = ours.num_parameters(active=True) - ours.model.embed_tokens.weight.numel()
    t_ours = timed(step_of(ours, lambda m, x: m(x)), device, repeats=2 if args.tiny else 5)
    profile = top_kernels(step_of(ours, lambda m, x: m(x)), device, n=15)
    del ours
    tokens = batch * seq
    result = {"model": name, "batch": batch, "seq": seq, "dtype": "bfloat16", "active_params": active,
              "bf16_matmul_peak_tflops": peak / 1e12, "ours_tokens_per_s": tokens / t_ours,
              "ours_mfu": 6 * active * tokens / t_ours / peak, "ours_top_kernels": profile}
    try:
        theirs = transformers_model(cfg, device, torch.bfloat16).train()
        t = timed(step_of(theirs, lambda m, x: m(x).logits), device, repeats=2 if args.tiny else 5)
        result.update(transformers_tokens_per_s=tokens / t, transformers_mfu=6 * active * tokens / t / peak,
                      speedup=t / t_ours)
    except Exception as e:
        result.update(transformers_tokens_per_s=None, transformers_error=f"{type(e).__name__}: {e}")
    return result


def section_grpo(device: torch.device, args) -> dict:
    """One GRPO step each, via bench/grpo_step.py in its own processes (its tiny model and data)."""
    if device.type != "cpu":
        raise RuntimeError("our trainer has no device setting yet (issue 20's device plumbing); "
                           "bench/grpo_step.py runs on the CPU")
    from grpo_step import trl_missing

    tokens, steps = (16, 2) if args.tiny else (32, 4)
    cmd = [sys.executable, str(ROOT / "bench" / "grpo_step.py"), "--steps", str(steps), "--tokens", str(tokens),
           "--threads", str(torch.get_num_threads())]
    runners = "ours" if trl_missing() else "ours,trl"
    out = subprocess.run([*cmd, "--runners", runners], capture_output=True, text=True, timeout=args.grpo_timeout,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"bench/grpo_step.py exited {out.returncode}: {out.stderr.strip()[-400:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return {"runners": runners, "trl_missing": trl_missing(), "tokens": tokens, "steps": steps, "grpo_step": figures}


RUNNERS: dict[str, Callable[[torch.device, argparse.Namespace], dict]] = {
    "parity": section_parity, "greedy": section_greedy, "logprobs": section_logprobs,
    "rollout": section_rollout, "train": section_train, "kernels": section_kernels, "grpo": section_grpo,
}


def run_section(name: str, device: torch.device, args) -> tuple[dict | None, str | None, float]:
    """(figures, None) or (None, the reason it failed), and its seconds."""
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        figures = RUNNERS[name](device, args)
        return figures, None, time.perf_counter() - t0
    except Exception as e:
        traceback.print_exc()
        return None, f"{type(e).__name__}: {e}"[:600], time.perf_counter() - t0
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def finite(x):
    """JSON-safe: NaN and inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and workloads (a CPU, or a quick check)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated, of {', '.join(SECTIONS)} (default: all; --tiny leaves out "
                         f"{', '.join(TINY_LEAVES_OUT)})")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--grpo-timeout", type=float, default=300, help="seconds the GRPO step section may take")
    ap.add_argument("--fail-section", action="append", default=[], choices=SECTIONS,
                    help="make a section fail on purpose (to check that the others still run)")
    args = ap.parse_args()
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        ap.error(f"--device {args.device!r}: allowed are cuda, cuda:N and cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device!r}: torch {torch.__version__} sees no CUDA device")
    sections = ([s.strip() for s in args.sections.split(",") if s.strip()] if args.sections else
                [s for s in SECTIONS if not (args.tiny and s in TINY_LEAVES_OUT)])
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; allowed are {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.fail_section:
        RUNNERS[name] = lambda d, a, name=name: (_ for _ in ()).throw(RuntimeError(f"{name} made to fail on purpose"))

    report: dict = {"device": device_info(device), "mode": "tiny" if args.tiny else "full",
                    "sections": dict.fromkeys(SECTIONS),
                    "failed": {}, "seconds": {}}
    for name in SECTIONS:
        if name not in sections:
            report["failed"][name] = ("left out by --tiny (name it in --sections to run it)"
                                      if args.sections is None else "not in --sections")
    t0 = time.perf_counter()
    for name in sections:
        figures, reason, seconds = run_section(name, device, args)
        report["sections"][name] = figures
        report["seconds"][name] = round(seconds, 2)
        if reason:
            report["failed"][name] = reason
        print(f"== {name} ({seconds:.1f} s): {json.dumps(finite(figures)) if figures else 'FAILED ' + reason}",
              flush=True)
    report["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(finite(report)))


if __name__ == "__main__":
    main()
