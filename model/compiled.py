"""The decode step compiled ahead of time with AOTInductor (opt-in: `CausalLM.compile_decode()`).

On a CPU a decode step of a small model is mostly fixed cost: some 400 small tensor ops at 2-5 us each,
whatever the batch. Compiled, each layer runs as a few calls into generated C++ (elementwise work fused,
matmuls left to MKL) and into our own kernels (`model.native`, float32 on a CPU), at a few microseconds
of call overhead each:

    layer_in:   norm, MLA's stacked down-projection, query LoRA, W_UK folded into the query, RoPE
                -> the query in latent space and the token's latent (written to the cache between calls)
    attention:  over the latent context in one pass, read in place from the paged pool through the block
                tables (`model.native`; else PyTorch's over the gathered context)
    layer_out:  W_UV and the output projection, residual, norm, then the dense MLP (dense layers) or the
                gate, the dispatch order and the shared experts (MoE)
    routed:     the routed experts, each on exactly its tokens (`model.native`); else a graph that pads
                every expert to the busiest one's count and runs two batched matmuls

The graphs are traced from the same functions the eager step runs (`LatentDecode`, `Routing`,
`sort_by_expert`, `padded_experts`, `swiglu`, `rms_norm`), with the weights as inputs, so one compiled
graph serves every layer and an optimizer step needs no recompilation. Batch size and expert capacity are
dynamic. Packages are cached on disk (`cache_dir()`), keyed by everything that shapes the graph (the
traced modules' source included), so only the first use of a model shape pays the compile (tens of
seconds)."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, native
from .attention import MLA, LatentDecode
from .cache import CacheView, PagedCacheView
from .moe import MLP, MoE, Routing, padded_experts, sort_by_expert, swiglu
from .native import cache_dir
from .norm import rms_norm

MAX = 1 << 20  # upper bound of the dynamic dimensions


@functools.cache
def _traced_source_hash() -> str:
    """The source of every module whose code the graphs are traced from: a change to it is a new package."""
    from . import attention, moe, norm

    files = [__file__, attention.__file__, moe.__file__, norm.__file__]
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()[:16]


# ----- the graphs: functions of tensors, some arguments fixed to None ------------------------------------
# `io` is the dtype of the residual stream between graphs and of the routed experts' inputs: the weights' own,
# or float32 where our routed-experts kernel takes them (a bfloat16 model on a CPU: its graphs compute in
# bfloat16, the kernel in float32; the casts fuse into the graphs' first and last loops). The query and the
# attention's output keep the weights' dtype, the cache's.
def layer_in(decode: LatentDecode, eps: float, x, ln_w, w_down, b_down, q_norm, w_q, w_uk, kv_norm, rope):
    """x [B, D] (io) -> query [B, H, r + dr], latent [B, r + dr]."""
    return decode.query_and_latent(rms_norm(x.to(ln_w.dtype), ln_w, eps), w_down, b_down, q_norm, w_q, w_uk,
                                   kv_norm, rope)


def layer_out_dense(decode: LatentDecode, eps: float, io: torch.dtype, x, out_latent, w_uv, w_o, b_o, post_w,
                    gate_up, down):
    """x [B, D] (io) and the attention's output in latent space [B, H, r] -> the block's output [B, D] (io)."""
    h = x.to(post_w.dtype) + decode.project_out(out_latent, w_uv, w_o, b_o)
    return (h + swiglu(rms_norm(h, post_w, eps), gate_up, down)).to(io)


def layer_out_moe(decode: LatentDecode, eps: float, io: torch.dtype, routing: Routing, x, out_latent, w_uv, w_o, b_o,
                  post_w, gate_w, correction_bias, shared_gate_up, shared_down):
    """-> h + shared experts [B, D], the routed experts' input [B, D], their weights [B, K] (all io) and ids
    [B, K], and `sort_by_expert`'s flat_ids, order, token_of, counts."""
    h = x.to(post_w.dtype) + decode.project_out(out_latent, w_uv, w_o, b_o)
    hn = rms_norm(h, post_w, eps)
    weights, expert_ids, _ = routing(F.linear(hn.float(), gate_w.float()), correction_bias)
    if shared_gate_up is not None:
        h = h + swiglu(hn, shared_gate_up, shared_down)
    return (h.to(io), hn.to(io), weights.to(io), expert_ids, *sort_by_expert(expert_ids, routing.n_experts))


def routed(base, x, weights, flat_ids, order, token_of, counts, capacity_like, gate_up, down):
    """base + the routed experts of x [B, D]; capacity_like [P]: its length is the padded count per expert."""
    return base + padded_experts(x, weights, flat_ids, order, token_of, counts, capacity_like.shape[0], gate_up, down)


class _Graph(nn.Module):
    """An export wrapper: fn(*args) where args marked absent in `present` are None."""

    def __init__(self, fn: Callable, present: tuple[bool, ...]):
        super().__init__()
        self.fn, self.present = fn, present

    def forward(self, *tensors: torch.Tensor):
        it = iter(tensors)
        return self.fn(*(next(it) if p else None for p in self.present))


class CompiledDecode:
    """The compiled decode step of one model (its shapes and dtype; any weights of those shapes)."""

    def __init__(self, model: nn.Module, verbose: bool = False):
        decoder = model.model
        self.decoder = decoder
        self.verbose = verbose
        self._graphs: dict[str, Callable[[list[torch.Tensor]], list[torch.Tensor]]] = {}
        weight = decoder.layers[0].self_attn.kv_b_proj.weight
        self.dtype = weight.dtype
        self._kernels = None  # `model.native`'s C++ kernels, where they serve (float32 or bfloat16 on a CPU)
        if weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu":
            try:
                self._kernels = native.decode_kernels(verbose)
            except Exception as e:  # e.g. a compiler without OpenMP: the graphs alone still serve
                warnings.warn(f"the decode step's C++ kernels did not build ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); attention and the "
                              f"routed experts run in PyTorch instead, slower. Set R1_GRPO_VERBOSE_BUILD=1 to see "
                              f"the build log.", RuntimeWarning, stacklevel=2)
        # The residual stream between graphs: float32 where the routed-experts kernel takes it, else the weights'
        # dtype.
        self.io_dtype = torch.float32 if self._kernels is not None else self.dtype
        dense = [b for b in decoder.layers if not isinstance(b.mlp, MoE)]
        moe = [b for b in decoder.layers if isinstance(b.mlp, MoE)]
        self._compile_layer_in(decoder.layers[0])
        if dense:
            self._compile_out_dense(dense[0])
        if moe:
            self._compile_out_moe(moe[0])
            if self._kernels is None and self.dtype == torch.float32:
                # (in bfloat16 the packaged graph's index_add fails at run time under torch 2.13: eager instead)
                self._compile_routed(moe[0])

    # ----- one step ---------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, rope: torch.Tensor, bias: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """What `Block.decode` over all layers computes: x [B, D] -> [B, D]."""
        x = x.to(self.io_dtype)
        for block in self.decoder.layers:
            attn: MLA = block.self_attn
            w_in, w_out = attn.decode_weights()
            q, latent = self._run("in", [x, block.input_layernorm.weight, *w_in, rope])
            cache.write(attn.layer_idx, latent[:, None])
            out_latent = self._attention(attn.decode, q, cache, attn.layer_idx, bias)
            post_w = block.post_attention_layernorm.weight
            mlp = block.mlp
            if not isinstance(mlp, MoE):
                (x,) = self._run("out_dense", [x, out_latent, *w_out, post_w, *mlp.decode_weights()])
                continue
            shared = mlp.shared_experts
            base, hn, weights, expert_ids, flat_ids, order, token_of, counts = self._run("out_moe", [
                x, out_latent, *w_out, post_w, mlp.gate.weight, mlp.gate.e_score_correction_bias,
                *(shared.decode_weights() if shared is not None else (None, None))])
            mlp.note_routing(expert_ids[:, None], counts)
            mlp.aux_loss = None
            experts = mlp.experts
            if self._kernels is not None:  # each expert on exactly its own tokens, in one call
                x = self._kernels.routed_experts(base, hn, weights, expert_ids, *experts.packed_weights())
                continue
            load = counts.tolist()
            if "routed" in self._graphs and experts.pads_well(load):
                (x,) = self._run("routed", [base, hn, weights, flat_ids, order, token_of, counts,
                                            hn.new_empty(max(load)), *experts.decode_weights()])
            else:  # a large batch: the experts' grouped path
                x = base + experts(hn, weights, expert_ids)
        return x.to(self.dtype)

    def _attention(self, decode: LatentDecode, q: torch.Tensor, cache: CacheView, layer: int,
                   bias: torch.Tensor) -> torch.Tensor:
        """q [B, H, r + dr], bias [B, S] -> [B, H, r]: the single-pass kernel where it serves (a CPU; float32
        queries over a float32 or bfloat16 cache; over a paged view it reads the pool in place through the block
        tables), else PyTorch's."""
        if self._kernels is not None:
            if isinstance(cache, PagedCacheView):
                return kernels.paged_latent_attention(q, cache.cache.data[layer], cache.block_tables, cache.lengths,
                                                      cache.block_size, decode.kv_lora_rank, decode.softmax_scale,
                                                      impl="cpu")
            return self._kernels.latent_attention(q.float(), cache.read_buffer(layer), bias, decode.kv_lora_rank,
                                                  decode.softmax_scale).to(q.dtype)
        return decode.attention(q, cache.read(layer), bias)

    @property
    def reads_pages(self) -> bool:
        """Whether `step` attends over a `PagedCacheView` in place (else it gathers the context)."""
        return self._kernels is not None

    def _run(self, name: str, args: list[torch.Tensor | None]) -> list[torch.Tensor]:
        return self._graphs[name]([a for a in args if a is not None])

    # ----- compiling ------------------------------------------------------------------------------------
    def _compile(self, name: str, fn: Callable, args: list[torch.Tensor | None], dims: list[dict | None],
                 key: tuple) -> None:
        """Exports fn over sample args with the given dynamic dims, compiles it (or loads the cached package)
        and keeps a runner that takes the present args as a list."""
        present = tuple(a is not None for a in args)
        tensors = [a for a in args if a is not None]
        dims = [d for a, d in zip(args, dims) if a is not None]
        signature = repr((name, key, present, [(tuple(t.shape), str(t.dtype), str(t.device)) for t in tensors],
                          torch.__version__, torch.backends.cpu.get_cpu_capability(),  # the code is built for this ISA
                          _traced_source_hash()))
        path = cache_dir() / f"{name}-{hashlib.sha256(signature.encode()).hexdigest()[:20]}.pt2"
        if not path.exists():
            if self.verbose:
                print(f"compiling the decode step's {name} graph (once per model shape) ...", flush=True)
            program = torch.export.export(_Graph(fn, present), tuple(tensors), dynamic_shapes={"tensors": tuple(dims)})
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                built = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/{path.name}")
                os.replace(built, path)  # atomic: a concurrent process sees a whole package or none
        package = torch._inductor.aoti_load_package(str(path))
        loader = getattr(package, "loader", None)
        self._graphs[name] = loader.run if loader is not None else (lambda ts, p=package: list(p(*ts)))

    def _samples(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Distinct sample activations (export would merge arguments that are the same tensor)."""
        attn: MLA = block.self_attn
        w = attn.kv_b_proj.weight
        B = 3
        D, dr = block.input_layernorm.weight.shape[0], attn.rope_dim
        gen = torch.Generator().manual_seed(0)
        make = lambda *shape: torch.randn(*shape, generator=gen).to(w)  # noqa: E731
        return {"x": make(B, D).to(self.io_dtype), "rope": make(B, dr, dr),
                "out_latent": make(B, attn.n_heads, attn.kv_lora_rank)}

    @staticmethod
    def _dims() -> dict[str, torch.export.Dim]:
        return {"B": torch.export.Dim("batch", min=1, max=MAX), "P": torch.export.Dim("capacity", min=1, max=MAX)}

    def _compile_layer_in(self, block: nn.Module) -> None:
        attn: MLA = block.self_attn
        s, d = self._samples(block), self._dims()
        w_in, _ = attn.decode_weights()
        eps = block.input_layernorm.eps
        self._compile("in", lambda *a: layer_in(attn.decode, eps, *a),
                      [s["x"], block.input_layernorm.weight, *w_in, s["rope"]],
                      [{0: d["B"]}, *[None] * len(w_in), None, {0: d["B"]}], (attn.decode, eps))

    def _attend_args(self, block: nn.Module) -> tuple[list, list]:
        s, d = self._samples(block), self._dims()
        _, w_out = block.self_attn.decode_weights()
        args = [s["x"], s["out_latent"], *w_out, block.post_attention_layernorm.weight]
        dims = [{0: d["B"]}, {0: d["B"]}, *[None] * (len(w_out) + 1)]
        return args, dims

    def _compile_out_dense(self, block: nn.Module) -> None:
        attn: MLA = block.self_attn
        mlp: MLP = block.mlp
        args, dims = self._attend_args(block)
        eps = block.post_attention_layernorm.eps
        io = self.io_dtype
        self._compile("out_dense", lambda *a: layer_out_dense(attn.decode, eps, io, *a),
                      [*args, *mlp.decode_weights()], [*dims, None, None], (attn.decode, eps, io))

    def _compile_out_moe(self, block: nn.Module) -> None:
        attn: MLA = block.self_attn
        mlp: MoE = block.mlp
        args, dims = self._attend_args(block)
        eps, routing = block.post_attention_layernorm.eps, mlp.gate.routing
        shared = mlp.shared_experts
        io = self.io_dtype
        self._compile("out_moe", lambda *a: layer_out_moe(attn.decode, eps, io, routing, *a),
                      [*args, mlp.gate.weight, mlp.gate.e_score_correction_bias,
                       *(shared.decode_weights() if shared is not None else (None, None))],
                      [*dims, None, None, None, None], (attn.decode, eps, io, routing))

    def _compile_routed(self, block: nn.Module) -> None:
        mlp: MoE = block.mlp
        s, d = self._samples(block), self._dims()
        B, K, E = s["x"].shape[0], mlp.top_k, mlp.n_experts
        expert_ids = ((torch.arange(B)[:, None] + torch.arange(K)[None]) % E).to(s["x"].device)  # distinct per token
        flat_ids, order, token_of, counts = sort_by_expert(expert_ids, E)
        weights = torch.rand(B, K).to(s["x"])
        pairs = {0: d["B"] * K}
        self._compile("routed", routed,
                      [s["x"], s["x"].clone(), weights, flat_ids, order, token_of, counts,
                       s["x"].new_empty(int(counts.max()) + 1), *mlp.experts.decode_weights()],
                      [{0: d["B"]}, {0: d["B"]}, {0: d["B"]}, pairs, pairs, pairs, None, {0: d["P"]}, None, None], ())
