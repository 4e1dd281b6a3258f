"""One entry per kernel, for the eager step, the compiled step and training alike. Each entry picks its
implementation from the tensors' device and dtype:

    CUDA with Triton installed                  -> the Triton kernel (decode_attention.py, moe.py, sampling.py);
                                                   for the LM head "chunked_triton" (lm_head_chunked.py: cuBLAS
                                                   matmuls a chunk of tokens at a time, Triton row kernels)
    CPU with `model.native` built               -> our C++ op (decode attention: float32 or bfloat16; routed
                                                   experts: float32)
    anything else                               -> the plain PyTorch reference (reference.py)

`impl=` forces one, as does $R1_GRPO_KERNELS: "triton", "cpu", "reference" for every entry, and for the LM head
"chunked_triton" or "triton" (the fused kernel, lm_head.py); "triton" on CPU tensors runs the kernel in Triton's
interpreter (tests). $R1_GRPO_KERNELS is a name for every entry, or a comma-separated list with `entry=impl`
items for one entry: "lm_head=triton" (the fused LM head, the rest by default), "reference,lm_head=chunked_triton".

LM head, forward + backward of 16k tokens x vocab 129,280 x hidden 2048 in bfloat16 on an H200: the fused kernel
315 ms and 1.7 GB, the unfused PyTorch path (whole [N, V] logits) 110 ms and 50.8 GB; "chunked_triton", the
default, is not yet measured on a GPU (bench/gpu_kernels.py times all three)."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference

IMPLS = ("triton", "cpu", "reference")
#: The entries whose implementations differ from IMPLS; the first is the entry's default on CUDA.
ENTRY_IMPLS = {"lm_head": ("chunked_triton", "triton", "reference")}


def _triton_installed() -> bool:
    """Whether triton can be imported (found without importing it: the Triton modules load on first use)."""
    return importlib.util.find_spec("triton") is not None


def _native():
    """`model.native`'s C++ kernels if this process has already built or loaded them (they take some 50 s
    to compile the first time on a machine, which an eager call must not pay unasked), else None."""
    from .. import native

    if native.decode_kernels.cache_info().currsize == 0:
        return None
    return native.decode_kernels()


def requested_impl(entry: str | None = None) -> str | None:
    """The implementation $R1_GRPO_KERNELS asks of `entry`: its `entry=impl` item, else the plain `impl` item
    that names one for every entry, else None."""
    every = None
    for item in os.environ.get("R1_GRPO_KERNELS", "").split(","):
        name, assigned, impl = item.strip().rpartition("=")
        if assigned and name == entry:
            return impl
        if not assigned and impl:
            every = impl
    return every


def select_impl(device: torch.device, dtype: torch.dtype, impl: str | None = None,
                cpu_dtypes: tuple[torch.dtype, ...] = (), entry: str | None = None) -> str:
    """The implementation an entry runs on tensors of `device` and `dtype`: `impl` if given (else
    $R1_GRPO_KERNELS, see `requested_impl`), else by the table in this module's docstring. cpu_dtypes: the
    dtypes the entry's C++ op takes (none: it has no C++ op). `entry` names an entry of ENTRY_IMPLS (its own
    implementations and CUDA default); the others choose among IMPLS."""
    allowed = ENTRY_IMPLS.get(entry, IMPLS)
    impl = impl or requested_impl(entry)
    if impl is not None:
        if impl not in allowed:
            raise ValueError(f"unknown kernel implementation {impl!r}" + (f" for {entry}" if entry else "")
                             + f"; choose one of {allowed}")
        if impl == "cpu" and not cpu_dtypes:
            raise ValueError("impl='cpu': this kernel has no C++ op; choose 'triton' or 'reference'")
        if impl == "cpu" and dtype not in cpu_dtypes:
            raise ValueError(f"impl='cpu': this kernel's C++ op takes {', '.join(map(str, cpu_dtypes))}, not {dtype}")
        return impl
    if device.type == "cuda" and _triton_installed():
        return allowed[0]
    if device.type == "cpu" and dtype in cpu_dtypes and _native() is not None:
        return "cpu"
    return "reference"


def paged_latent_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
                           block_size: int, rank: int, scale: float, impl: str | None = None) -> torch.Tensor:
    """One decode step of weight-absorbed MLA attention, reading the paged latent pool in place:
    softmax(scale * q . c_s) . c_s[:rank] over positions s < lengths[b] of sequence b, whose position s lives
    in slot block_tables[b, s // block_size] * block_size + s % block_size.

    q:            [B, H, R] the query in latent space: q_nope . W_UK [.., :rank] then the roped q_pe (R = rank + dr)
    pool:         [N, R] one layer of the `LatentCache` (normalized latent, then the roped key), q's dtype
    block_tables: [B, W] int32; lengths: [B] int64 (0: an empty context, whose output is zeros)
    scale:        the softmax scale, YaRN's mscale already applied (`ModelConfig.softmax_scale`)
    Returns [B, H, rank] in q's dtype (float32, float16 or bfloat16; accumulated in float32). The C++ op takes
    float32 and bfloat16 (a bfloat16 pool read as is, the small query widened to float32)."""
    if pool.dtype != q.dtype or q.shape[-1] != pool.shape[-1] or q.shape[-1] <= rank:
        raise ValueError(f"paged_latent_attention: need q [B, H, R] and pool [N, R] of one dtype with R > rank={rank}, "
                         f"got {tuple(q.shape)} {q.dtype} and {tuple(pool.shape)} {pool.dtype}")
    chosen = select_impl(q.device, q.dtype, impl, cpu_dtypes=(torch.float32, torch.bfloat16))
    if chosen == "triton":
        from . import decode_attention

        return decode_attention.paged_latent_attention(q, pool, block_tables, lengths, block_size, rank, scale)
    if chosen == "cpu":
        from .. import native

        return native.decode_kernels().latent_attention_paged(
            q.float().contiguous(), pool, block_tables.to(torch.int32), lengths.to(torch.int64), block_size, rank,
            float(scale)).to(q.dtype)
    return reference.paged_latent_attention(q, pool, block_tables, lengths, block_size, rank, scale)


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     temperature: float | torch.Tensor = 1.0, with_entropy: bool = False, impl: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(hidden @ weight.T / temperature)[targets] per token, and (with_entropy) the entropy of that
    distribution, without the [N, V] logits ever held whole; differentiable in hidden and weight.

    hidden:      [..., D] final hidden states (after the final norm); weight: [V, D] the LM head, same dtype
    targets:     [...] int token ids in [0, V)
    temperature: a float, or [...] one per token (positive)
    impl:        "chunked_triton" (the CUDA default), "triton" (the fused kernel) or "reference"
    Returns logprobs [...] float32 and entropy [...] float32 (None unless with_entropy)."""
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"lm_head_logprobs: need hidden [..., D], weight [V, D] and targets [...], got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    if isinstance(temperature, torch.Tensor):
        inv_t = (1.0 / temperature.float()).reshape(-1).expand(flat.shape[0])
    else:
        if temperature <= 0:
            raise ValueError(f"lm_head_logprobs: temperature must be positive, got {temperature}")
        inv_t = torch.full((flat.shape[0],), 1.0 / temperature, dtype=torch.float32, device=hidden.device)
    chosen = select_impl(hidden.device, hidden.dtype, impl, entry="lm_head")
    if chosen != "reference" and flat.shape[0] > 0:
        if weight.dtype != hidden.dtype:
            raise ValueError(f"lm_head_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}")
        if chosen == "chunked_triton":
            from . import lm_head_chunked as path
        else:
            from . import lm_head as path
        logprobs, entropy, _ = path.lm_head_logprobs(flat, weight, flat_targets, inv_t)
    else:
        logprobs, entropy, _ = reference.lm_head_logprobs(flat, weight, flat_targets, 1.0 / inv_t, with_entropy)
    return logprobs.view(targets.shape), entropy.view(targets.shape) if with_entropy else None


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, impl: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's row once per chosen expert, in expert order (stable), without a host sync.
    x [N, D], expert_ids [N, K] int64 -> xs [N*K, D], token_of [N*K] (each row's token), inverse [N*K]
    (the row of pair n*K + k in xs) and offsets [E + 1] int32 (expert e's rows: offsets[e]:offsets[e+1])."""
    if select_impl(x.device, x.dtype, impl) == "triton":
        from . import moe

        return moe.moe_permute(x, expert_ids, n_experts)
    return reference.moe_permute(x, expert_ids, n_experts)


def moe_unpermute(ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor, impl: str | None = None
                  ) -> torch.Tensor:
    """The experts' rows back to their tokens, weighted, by gathers (no atomics): ys [N*K, D] in expert order,
    inverse [N*K] (`moe_permute`), weights [N, K] -> sum_k weights[n, k] ys[inverse[n*K + k]]  [N, D], ys' dtype."""
    if select_impl(ys.device, ys.dtype, impl) == "triton":
        from . import moe

        return moe.moe_unpermute(ys, inverse, weights)
    return reference.moe_unpermute(ys, inverse, weights)


def grouped_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, swiglu: bool = False,
                 impl: str | None = None) -> torch.Tensor:
    """Each expert's rows times its matrix, all experts in one launch: xs [M, K] in expert order, w [E, N, K]
    (nn.Linear's layout, as `Experts` stores it), offsets [E + 1] int32 (`moe_permute`) -> [M, N];
    swiglu: w is gate_up [E, 2I, K] and the result silu(gate) * up [M, I]. xs' dtype, float32 accumulation.
    Forward only (no autograd; `routed_experts` is the differentiable whole)."""
    if select_impl(xs.device, xs.dtype, impl) == "triton":
        from . import moe

        return moe.grouped_gemm(xs, w, offsets, swiglu)
    return reference.grouped_gemm(xs, w, offsets, swiglu)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor] | None = None,
                   impl: str | None = None) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{ids[:, k]}(x), each expert a SwiGLU MLP.
    x [N, D], weights/expert_ids [N, K], gate_up_proj [E, 2I, D], down_proj [E, D, I] (`Experts`' parameters);
    packed: `Experts.packed_weights()`, which the C++ op needs (without it that path is not taken) -> [N, D].

    Differentiable in x, weights, gate_up_proj and down_proj when autograd records (training): the Triton path
    then runs `moe.RoutedExperts`, its own backward, with no host read of the expert counts (its matmuls in
    torch._grouped_mm where `grouped_mm_fits`); the reference differentiates by torch.autograd; the C++ op,
    forward only, is not taken. Without autograd (inference) the Triton path fuses the SwiGLU into its GEMM."""
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, gate_up_proj, down_proj))
    chosen = select_impl(x.device, x.dtype, impl, cpu_dtypes=(torch.float32,) if packed is not None else ())
    if chosen == "cpu" and training:
        chosen = "reference"
    if chosen == "cpu":
        from .. import native

        return native.decode_kernels().routed_experts(torch.zeros_like(x), x, weights.to(x.dtype), expert_ids.long(),
                                                     *packed)
    if chosen == "reference":
        return reference.routed_experts(x, weights, expert_ids, gate_up_proj, down_proj)
    if training:
        from . import moe

        if gate_up_proj.dtype != x.dtype or down_proj.dtype != x.dtype:
            raise ValueError(f"routed_experts: x is {x.dtype} but the projections are {gate_up_proj.dtype} and "
                             f"{down_proj.dtype}; cast them to one dtype (autocast does not reach Triton kernels)")
        gemm = "grouped_mm" if grouped_mm_fits(x, gate_up_proj, down_proj) else "triton"
        return moe.routed_experts(x, weights.to(x.dtype), expert_ids, gate_up_proj, down_proj, gemm=gemm)
    xs, _, inverse, offsets = moe_permute(x, expert_ids, gate_up_proj.shape[0], impl=chosen)
    h = grouped_gemm(xs, gate_up_proj, offsets, swiglu=True, impl=chosen)
    return moe_unpermute(grouped_gemm(h, down_proj, offsets, impl=chosen), inverse, weights.to(x.dtype), impl=chosen)


def grouped_mm_fits(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether the training path's matmuls go to torch._grouped_mm (private, as transformers uses it: CUTLASS
    grouped GEMMs) rather than Triton's grouped GEMM: bfloat16 on a Hopper or Blackwell GPU (capability 9.x or
    10.x; elsewhere PyTorch falls back to a loop that reads the offsets on the host), rows of 16 bytes (D and I
    multiples of 8). On an H200, forward + backward of 4096 tokens x top-8 of 64 experts (D 2048, I 1024):
    3.4 ms against 8.4 ms with the Triton GEMMs and 66 ms for the per-expert loop Experts ran before."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and gate_up_proj.dtype == down_proj.dtype == torch.bfloat16):
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    return major in (9, 10) and x.shape[1] % 8 == 0 and down_proj.shape[2] % 8 == 0


def counter_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                   greedy: torch.Tensor, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's counter sampler without top-k/top-p/min-p filters, in one pass over the logits where Triton
    runs (no host sync: a CUDA graph can capture it): logits [B, V], temperature [B] (positive; 1 for greedy
    rows), seeds and positions [B] int64 (each row's stream seed and the index of the token it draws), greedy
    [B] bool -> tokens [B] int64 and their log-probs [B] float32 under log_softmax(logits / temperature).
    See `reference.counter_sample`."""
    if select_impl(logits.device, logits.dtype, impl) == "triton":
        from . import sampling

        return sampling.counter_sample(logits, temperature, seeds, positions, greedy)
    return reference.counter_sample(logits, temperature, seeds, positions, greedy)
