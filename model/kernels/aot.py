"""Compile every Triton kernel of `model.kernels` ahead of time for GPUs this machine need not have, at the
tile sizes and dtypes the dispatch launches: a CI check that each compiles and fits the card's shared memory.

    python -m model.kernels.aot [--arch 90 80]

prints per kernel and architecture its shared memory and, for kernels with a tl.dot, whether the Hopper PTX
multiplies with wgmma; exits 1 if any kernel fails to compile or needs more shared memory than the card has.
Run it with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from . import decode_attention, lm_head, lm_head_chunked, moe, sampling
from ._triton import next_power_of_2

#: Shared memory a block may use, bytes (H100/H200: 227 KB; A100: 163 KB).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Spec:
    """One kernel as a launch compiles it: the argument types (pointers by their element type), constexprs, options."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict = field(default_factory=dict)
    uses_dot: bool = True


def _sig(kernel, types: dict[str, str]) -> dict[str, str]:
    return {name: types[name] for name in kernel.arg_names if name in types}


def specs(rank: int = 512, rope_dim: int = 64) -> list[Spec]:
    """The launches of the dispatch, per dtype (DeepSeek-V3's latent rank and rope dim by default)."""
    out = []
    for dtype, t in DTYPES.items():
        BLOCK_R, BLOCK_DR = decode_attention.block_sizes(rank, rope_dim)
        # The launch shapes the dispatch picks: a long-context small batch, a decode batch, V3's 128 heads.
        for batch, heads in ((8, 16), (128, 16), (8, 128)):
            config = decode_attention.launch_config(batch, heads)
            splits = config["NUM_SPLITS"]
            shape = f"h{config['BLOCK_H']}n{config['BLOCK_N']}s{splits}"
            out.append(Spec(f"decode_attention.split[{t},{shape}]", decode_attention._split_kernel, _sig(
                decode_attention._split_kernel,
                dict(q_ptr=f"*{t}", pool_ptr=f"*{t}", tables_ptr="*i32", lengths_ptr="*i64", part_out_ptr="*fp32",
                     part_lse_ptr="*fp32", scale="fp32", H="i32", rank="i32", rope_dim="i32", block_size="i32",
                     stride_qb="i32", stride_qh="i32", stride_pool="i32", stride_tb="i32")),
                dict(BLOCK_H=config["BLOCK_H"], BLOCK_N=config["BLOCK_N"], BLOCK_R=BLOCK_R,
                     BLOCK_DR=BLOCK_DR, NUM_SPLITS=splits, PRECISION=decode_attention.precision(dtype)),
                dict(num_warps=config["NUM_WARPS"])))
            out.append(Spec(f"decode_attention.merge[{t},s{splits}]", decode_attention._merge_kernel, _sig(
                decode_attention._merge_kernel,
                dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr=f"*{t}", rank="i32", stride_ob="i32",
                     stride_oh="i32", H="i32")),
                dict(BLOCK_R=BLOCK_R, NUM_SPLITS=splits, SPLITS_P2=next_power_of_2(splits)), uses_dot=False))

        blocks = dict(BLOCK_M=lm_head.BLOCK_M, BLOCK_V=lm_head.BLOCK_V, BLOCK_D=lm_head.BLOCK_D,
                      PRECISION=lm_head._precision(dtype))
        common = dict(h_ptr=f"*{t}", w_ptr=f"*{t}", targets_ptr="*i64", inv_t_ptr="*fp32", N="i32", V="i32",
                      D="i32", stride_h="i32", stride_w="i32")
        out.append(Spec(f"lm_head.forward[{t}]", lm_head._forward_kernel, _sig(lm_head._forward_kernel, dict(
            common, m_ptr="*fp32", l_ptr="*fp32", s_ptr="*fp32", tz_ptr="*fp32", cols_per_split="i32")),
            blocks, dict(num_warps=lm_head.NUM_WARPS)))
        grads = dict(common, lse_ptr="*fp32", ent_ptr="*fp32", g_lp_ptr="*fp32", g_ent_ptr="*fp32",
                     dh_ptr="*fp32", dw_ptr="*fp32")
        for name, kernel in (("grad_hidden", lm_head._grad_hidden_kernel), ("grad_weight", lm_head._grad_weight_kernel)):
            out.append(Spec(f"lm_head.{name}[{t}]", kernel, _sig(kernel, grads),
                            dict(blocks, HAS_G_LP=True, HAS_G_ENT=True), dict(num_warps=lm_head.NUM_WARPS)))
        # the chunked path's row kernels over the cuBLAS logits (the matmul's dtype); both gradient terms on
        rows = dict(z_ptr=f"*{t}", targets_ptr="*i64", inv_t_ptr="*fp32", lse_ptr="*fp32", V="i32", stride_z="i32")
        chunked = dict(BLOCK_V=lm_head_chunked.BLOCK_V)
        out.append(Spec(f"lm_head_chunked.row_forward[{t}]", lm_head_chunked._row_forward_kernel, _sig(
            lm_head_chunked._row_forward_kernel, dict(rows, logprobs_ptr="*fp32", entropy_ptr="*fp32")),
            chunked, dict(num_warps=lm_head_chunked.NUM_WARPS), uses_dot=False))
        out.append(Spec(f"lm_head_chunked.row_backward[{t}]", lm_head_chunked._row_backward_kernel, _sig(
            lm_head_chunked._row_backward_kernel, dict(rows, ent_ptr="*fp32", g_lp_ptr="*fp32", g_ent_ptr="*fp32")),
            dict(chunked, HAS_G_LP=True, HAS_G_ENT=True), dict(num_warps=lm_head_chunked.NUM_WARPS), uses_dot=False))

        out.append(Spec(f"sampling.counter_sample[{t}]", sampling._sample_kernel, _sig(sampling._sample_kernel, dict(
            logits_ptr=f"*{t}", temperature_ptr="*fp32", seeds_ptr="*i64", positions_ptr="*i64", greedy_ptr="*i8",
            tokens_ptr="*i64",
            logprobs_ptr="*fp32", V="i32", stride_l="i32")), dict(BLOCK_V=sampling.BLOCK_V),
            dict(num_warps=sampling.NUM_WARPS), uses_dot=False))

        gather = dict(BLOCK_ROWS=moe.BLOCK_ROWS, BLOCK_COLS=moe.BLOCK_COLS)
        out.append(Spec(f"moe.gather_rows[{t}]", moe._gather_rows_kernel, _sig(moe._gather_rows_kernel, dict(
            x_ptr=f"*{t}", index_ptr="*i64", out_ptr=f"*{t}", M="i32", D="i32", stride_x="i32", stride_o="i32")),
            gather, uses_dot=False))
        out.append(Spec(f"moe.unpermute[{t}]", moe._unpermute_kernel, _sig(moe._unpermute_kernel, dict(
            ys_ptr=f"*{t}", inverse_ptr="*i64", weights_ptr=f"*{t}", out_ptr=f"*{t}", N="i32", D="i32", K="i32",
            stride_y="i32", stride_o="i32")), gather, uses_dot=False))
        gemm = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", tile_expert_ptr="*i32", tile_start_ptr="*i64",
                    tile_end_ptr="*i64", out_ptr=f"*{t}", N="i32", K="i32", I="i32", stride_x="i32", stride_we="i32",
                    stride_o="i32")
        # A unit stride is a constant in the compiled kernel (Triton specializes ints equal to 1): the forward
        # reads nn.Linear's layout (stride_wk 1), the training backward's d(input) the transposed matrix
        # (stride_wn 1). Each at the tiles `gemm_config` picks for decode and for training sizes.
        for name, swiglu, unit in (("grouped_gemm", False, "stride_wk"), ("grouped_gemm_swiglu", True, "stride_wk"),
                                   ("grouped_gemm_transposed_w", False, "stride_wn")):
            other = "stride_wn" if unit == "stride_wk" else "stride_wk"
            configs = {tuple(c.items()): c for c in (moe.gemm_config(rows, swiglu) for rows in (768, 98304))}
            for config in configs.values():  # the distinct ones
                shape = f"m{config['BLOCK_M']}n{config['BLOCK_N']}k{config['BLOCK_K']}"
                out.append(Spec(f"moe.{name}[{t},{shape}]", moe._grouped_gemm_kernel,
                                _sig(moe._grouped_gemm_kernel, dict(gemm, **{unit: "constexpr", other: "i32"})),
                                {unit: 1, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
                                 "BLOCK_K": config["BLOCK_K"], "SWIGLU": swiglu, "PRECISION": moe.precision(dtype)},
                                dict(num_warps=config["NUM_WARPS"])))
        out.append(Spec(f"moe.grouped_outer[{t}]", moe._grouped_outer_kernel, _sig(moe._grouped_outer_kernel, dict(
            a_ptr=f"*{t}", b_ptr=f"*{t}", offsets_ptr="*i32", out_ptr=f"*{t}", P="i32", Q="i32", stride_a="i32",
            stride_b="i32", stride_oe="i32", stride_op="i32")),
            dict(BLOCK_P=moe.OUTER_BLOCK_P, BLOCK_Q=moe.OUTER_BLOCK_Q, BLOCK_R=moe.OUTER_BLOCK_R,
                 PRECISION=moe.precision(dtype)), dict(num_warps=moe.OUTER_NUM_WARPS)))
        out.append(Spec(f"moe.swiglu[{t}]", moe._swiglu_kernel, _sig(moe._swiglu_kernel, dict(
            gu_ptr=f"*{t}", h_ptr=f"*{t}", M="i32", I="i32", stride_gu="i32", stride_h="i32")), gather,
            uses_dot=False))
        out.append(Spec(f"moe.swiglu_backward[{t}]", moe._swiglu_backward_kernel, _sig(moe._swiglu_backward_kernel, dict(
            gu_ptr=f"*{t}", dh_ptr=f"*{t}", dgu_ptr=f"*{t}", h_ptr=f"*{t}", M="i32", I="i32", stride_gu="i32",
            stride_dh="i32", stride_h="i32")), gather, uses_dot=False))
        out.append(Spec(f"moe.permute_grad[{t}]", moe._permute_grad_kernel, _sig(moe._permute_grad_kernel, dict(
            g_ptr=f"*{t}", order_ptr="*i64", weights_ptr=f"*{t}", out_ptr=f"*{t}", M="i32", D="i32", K="i32",
            stride_g="i32", stride_o="i32")), gather, uses_dot=False))
        out.append(Spec(f"moe.weights_grad[{t}]", moe._weights_grad_kernel, _sig(moe._weights_grad_kernel, dict(
            g_ptr=f"*{t}", ys_ptr=f"*{t}", inverse_ptr="*i64", out_ptr="*fp32", N="i32", D="i32", K="i32",
            stride_g="i32", stride_y="i32")), gather, uses_dot=False))
    return out


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compiles one spec for sm_<arch> (pointers assumed 16-byte aligned, as PyTorch allocates) -> its
    shared memory (bytes), whether the PTX uses wgmma, and the fit to the card."""
    import triton
    from triton.backends.compiler import GPUTarget

    pointers = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(spec.kernel.arg_names)
                if spec.signature.get(name, "").startswith("*")}
    source = triton.compiler.ASTSource(spec.kernel, spec.signature, spec.constexprs, pointers)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=spec.options)
    shared = compiled.metadata.shared
    return {"shared": shared, "fits": shared <= SHARED_LIMIT[arch], "wgmma": "wgmma" in compiled.asm["ptx"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = parser.parse_args(argv)
    failed = []
    for spec in specs():
        if args.only not in spec.name:
            continue
        for arch in args.arch:
            try:
                r = compile_spec(spec, arch)
            except Exception as e:
                failed.append(f"{spec.name} sm_{arch}")
                print(f"sm_{arch} {spec.name}: FAILED to compile: {type(e).__name__}: {str(e).strip()[:500]}")
                continue
            dot = (" wgmma" if r["wgmma"] else " no wgmma") if spec.uses_dot and arch >= 90 else ""
            print(f"sm_{arch} {spec.name}: shared {r['shared'] / 1024:.1f} KB of {SHARED_LIMIT[arch] // 1024} KB{dot}"
                  + ("" if r["fits"] else "  TOO MUCH SHARED MEMORY"), flush=True)
            if not r["fits"]:
                failed.append(f"{spec.name} sm_{arch}")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
