"""Tile sizes of our Triton kernels, swept on the GPU at hand: each variant is checked against the PyTorch
reference (relative error) and timed (median of CUDA-event timings), at the shapes bench/gpu.py reports.
The first variant of each kernel is the shape the dispatch used before the sweep of 2026-12-04 (H200); the
dispatch's current choices (`launch_config`, `gemm_config`, lm_head's constants) come from that sweep.

    python bench/gpu_sweep.py                      # every kernel (a few minutes on an H200)
    python bench/gpu_sweep.py --kernels attention  # one
    python bench/gpu_sweep.py --device cpu --tiny  # proves the script (reference-sized shapes, interpreter off)

Last line: one JSON object {kernel: {case: [{config, ms, rel_error | error}, ...]}, "best": {...}}."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_kernels import bench_ms  # noqa: E402

from model import kernels  # noqa: E402
from model.kernels import decode_attention, lm_head, moe, reference  # noqa: E402

ATTENTION = [dict(TARGET_PROGRAMS=256, MAX_SPLITS=16, BLOCK_H=16, BLOCK_N=32, NUM_WARPS=4),
             dict(TARGET_PROGRAMS=1024, MAX_SPLITS=64, BLOCK_H=16, BLOCK_N=32, NUM_WARPS=4),
             dict(TARGET_PROGRAMS=1024, MAX_SPLITS=64, BLOCK_H=16, BLOCK_N=64, NUM_WARPS=4),
             dict(TARGET_PROGRAMS=1024, MAX_SPLITS=64, BLOCK_H=16, BLOCK_N=64, NUM_WARPS=8),
             dict(TARGET_PROGRAMS=2048, MAX_SPLITS=128, BLOCK_H=16, BLOCK_N=64, NUM_WARPS=4),
             dict(TARGET_PROGRAMS=1024, MAX_SPLITS=64, BLOCK_H=32, BLOCK_N=32, NUM_WARPS=8),
             dict(TARGET_PROGRAMS=1024, MAX_SPLITS=64, BLOCK_H=64, BLOCK_N=32, NUM_WARPS=8)]
GEMM = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, NUM_WARPS=4),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, NUM_WARPS=4),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, NUM_WARPS=4),
        dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, NUM_WARPS=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, NUM_WARPS=8),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, NUM_WARPS=8),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, NUM_WARPS=4)]
LM_HEAD = [dict(BLOCK_M=64, BLOCK_V=64, BLOCK_D=64, NUM_WARPS=4),
           dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64, NUM_WARPS=8),
           dict(BLOCK_M=128, BLOCK_V=64, BLOCK_D=64, NUM_WARPS=4),
           dict(BLOCK_M=64, BLOCK_V=128, BLOCK_D=64, NUM_WARPS=4),
           dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=32, NUM_WARPS=8)]


def with_config(module, config: dict, fn):
    """fn() with the module's launch shapes set to config (its OVERRIDE where it has one, else its tile
    constants), restored after."""
    if hasattr(module, "OVERRIDE"):
        saved_override = module.OVERRIDE
        module.OVERRIDE = config
        try:
            return fn()
        finally:
            module.OVERRIDE = saved_override
    saved = {k: getattr(module, k) for k in config}
    try:
        for k, v in config.items():
            setattr(module, k, v)
        return fn()
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def sweep(module, configs: list[dict], make_case, device) -> list[dict]:
    rows = []
    run, check = make_case()  # inputs and the reference once per case
    for config in configs:
        try:
            err = with_config(module, config, check)
            ms = with_config(module, config, lambda: bench_ms(run, device, reps=10))
            rows.append({"config": config, "ms": ms, "rel_error": err})
        except Exception as e:
            traceback.print_exc()
            rows.append({"config": config, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def attention_case(device, dtype, batch, context, heads, impl):
    R, rank, bs = 576, 512, 16
    blocks = -(-context // bs)
    gen = torch.Generator(device=device).manual_seed(0)
    pool = torch.randn(batch * blocks * bs, R, device=device, dtype=dtype, generator=gen)
    tables = torch.randperm(batch * blocks, device=device, generator=gen).view(batch, blocks).to(torch.int32)
    lengths = torch.full((batch,), context, dtype=torch.int64, device=device)
    q = torch.randn(batch, heads, R, device=device, dtype=dtype, generator=gen)
    ref = reference.paged_latent_attention(q, pool, tables, lengths, bs, rank, R ** -0.5)

    def run():
        return kernels.paged_latent_attention(q, pool, tables, lengths, bs, rank, R ** -0.5, impl=impl)
    return run, lambda: rel(run(), ref)


def gemm_case(device, dtype, tokens, swiglu, impl, experts=64, top_k=6, dim=2048, inter=1408):
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, dim=-1).indices
    _, _, offsets = reference.permutation_plan(ids, experts)
    if swiglu:
        xs = torch.randn(tokens * top_k, dim, device=device, dtype=dtype, generator=gen)
        w = torch.randn(experts, 2 * inter, dim, device=device, dtype=dtype, generator=gen) * dim ** -0.5
    else:
        xs = torch.randn(tokens * top_k, inter, device=device, dtype=dtype, generator=gen)
        w = torch.randn(experts, dim, inter, device=device, dtype=dtype, generator=gen) * inter ** -0.5
    ref = reference.grouped_gemm(xs, w, offsets, swiglu)

    def run():
        return kernels.grouped_gemm(xs, w, offsets, swiglu, impl=impl)
    return run, lambda: rel(run(), ref)


def lm_head_case(device, dtype, tokens, vocab, hidden, impl):
    gen = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    temperature = torch.full((tokens,), 0.9, device=device)
    lp_ref, _, _ = reference.lm_head_logprobs(h.detach(), w.detach(), targets, temperature)

    def run():
        lp, ent = kernels.lm_head_logprobs(h, w, targets, temperature, with_entropy=True, impl=impl)
        (lp.sum() + 0.01 * ent.sum()).backward()
        h.grad = w.grad = None
        return lp
    return run, lambda: rel(run().detach(), lp_ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small shapes, the reference path (a CPU)")
    ap.add_argument("--kernels", default="attention,grouped_gemm,lm_head")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl = "triton" if device.type == "cuda" else "reference"
    chosen = args.kernels.split(",")
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if "attention" in chosen:
        cases = [(2, 300, 16)] if args.tiny else [(8, 32768, 16), (8, 32768, 128), (128, 1024, 16), (512, 512, 16)]
        out["attention"] = {f"b{b}_ctx{c}_h{h}": sweep(decode_attention, ATTENTION[:2] if args.tiny else ATTENTION,
                                                       lambda b=b, c=c, h=h: attention_case(device, dtype, b, c, h, impl),
                                                       device) for b, c, h in cases}
    if "grouped_gemm" in chosen:
        cases = [(16, True)] if args.tiny else [(128, True), (128, False), (512, True), (16384, True), (16384, False)]
        out["grouped_gemm"] = {f"tokens{t}_{'swiglu' if s else 'down'}": sweep(
            moe, GEMM[:2] if args.tiny else GEMM,
            lambda t=t, s=s: gemm_case(device, dtype, t, s, impl, **(dict(dim=64, inter=48) if args.tiny else {})),
            device)
            for t, s in cases}
    if "lm_head" in chosen:
        shape = (64, 300, 32) if args.tiny else (16384, 129280, 2048)
        out["lm_head"] = {"x".join(map(str, shape)): sweep(lm_head, LM_HEAD[:2] if args.tiny else LM_HEAD,
                                                            lambda: lm_head_case(device, dtype, *shape, impl), device)}
    best = {}
    for kernel in ("attention", "grouped_gemm", "lm_head"):
        for case, rows in out.get(kernel, {}).items():
            ok = [r for r in rows if "ms" in r and r["rel_error"] < 2e-2]
            if ok:
                top = min(ok, key=lambda r: r["ms"])
                best[f"{kernel}/{case}"] = {"config": top["config"], "ms": top["ms"],
                                            "default_ms": rows[0].get("ms"), "gain": (rows[0].get("ms") or 0) / top["ms"]}
    out["best"] = best
    print(json.dumps(out))


if __name__ == "__main__":
    main()
