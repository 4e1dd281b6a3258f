"""The plain PyTorch versions of `model.kernels`' entries: what they compute, by definition. Every other
path is tested against these, and they serve where no faster path does (any device, any dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def paged_latent_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
                           block_size: int, rank: int, scale: float) -> torch.Tensor:
    """softmax(scale * q . c) . c[..., :rank] over each sequence's first lengths[b] positions, gathered
    through its block table. q [B, H, R] (R = rank + rope dim), pool [N, R], block_tables [B, W], lengths [B]
    -> [B, H, rank] in q's dtype, float32 inside; zeros for an empty context."""
    B, W = block_tables.shape
    S = W * block_size
    position = torch.arange(S, device=q.device)
    slots = block_tables.long().gather(1, (position // block_size).expand(B, S)) * block_size + position % block_size
    valid = position < lengths[:, None]  # [B, S]
    context = pool.index_select(0, torch.where(valid, slots, 0).reshape(-1)).view(B, S, -1).float()
    scores = torch.bmm(q.float(), context.transpose(1, 2)) * scale  # [B, H, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # an empty context: all -inf -> zeros
    return torch.bmm(probs, context[..., :rank]).to(q.dtype)


def _lm_head_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temperature: torch.Tensor,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = (hidden @ weight.T).float() * inv_temperature[:, None]  # [n, V]
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(1, targets[:, None])[:, 0] - lse
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(dim=-1) if with_entropy else lse.new_zeros(0)
    return logprobs, entropy, lse


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     temperature: torch.Tensor, with_entropy: bool = False, chunk_size: int = 1024
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token log_softmax(hidden @ weight.T / temperature)[target], the log-sum-exp and (with_entropy) the
    entropy, a chunk of rows at a time (each chunk's logits recomputed in the backward, never [N, V] at once).
    hidden [N, D], weight [V, D], targets [N] int64, temperature [N] float32 -> logprobs [N], entropy [N]
    (or [0]), lse [N], all float32; differentiable in hidden and weight."""
    inv_t = 1.0 / temperature.float()
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (hidden[rows], weight, targets[rows], inv_t[rows], with_entropy)
        grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        parts.append(checkpoint(_lm_head_chunk, *args, use_reentrant=False) if grad else _lm_head_chunk(*args))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's row once per chosen expert, in expert order (stable): x [N, D], expert_ids [N, K] ->
    xs [N*K, D], token_of [N*K] (the token of each row), inverse [N*K] (row of pair n*K + k in xs) and
    offsets [E + 1] int32 (expert e's rows are offsets[e]:offsets[e+1]). No host sync."""
    token_of, inverse, offsets = permutation_plan(expert_ids, n_experts)
    return x.index_select(0, token_of), token_of, inverse, offsets


def permutation_plan(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [N, K] -> token_of [N*K], inverse [N*K], offsets [E + 1] int32 of `moe_permute`: a stable
    sort by expert, on the device (no host sync). The Triton path gathers the rows by the same plan."""
    order, inverse, offsets = pair_order(expert_ids, n_experts)
    return order // expert_ids.shape[1], inverse, offsets


def pair_order(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [N, K] -> order [N*K] (the (token, k) pair n*K + k in each row of expert order), inverse [N*K]
    (its inverse) and offsets [E + 1] int32: `permutation_plan` before order becomes tokens (the backward
    needs the pairs, for their routing weights)."""
    N, K = expert_ids.shape
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=expert_ids.device))
    counts = torch.zeros(n_experts, dtype=torch.int64, device=expert_ids.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return order, inverse, F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)


def moe_unpermute(ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts' rows back to their tokens, weighted: ys [N*K, D] (expert order), inverse [N*K],
    weights [N, K] -> sum_k weights[n, k] * ys[inverse[n*K + k]]  [N, D] in ys' dtype, float32 inside."""
    N, K = weights.shape
    rows = ys.index_select(0, inverse).view(N, K, ys.shape[1]).float()
    return (rows * weights.float()[..., None]).sum(dim=1).to(ys.dtype)


def grouped_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """Rows in expert order times their expert's matrix (nn.Linear's layout): xs [M, K], w [E, N, K],
    offsets [E + 1] -> xs_e @ w_e.T [M, N]; swiglu: w holds [gate; up] (N = 2I), the result is
    silu(gate) * up [M, I]. float32 inside, xs' dtype out. (A host sync: the reference loops over experts.)"""
    bounds = offsets.tolist()
    outs = []
    for e in range(w.shape[0]):
        rows = xs[bounds[e]:bounds[e + 1]].float()
        y = rows @ w[e].float().T
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        outs.append(y)
    n_out = w.shape[1] // 2 if swiglu else w.shape[1]
    return torch.cat(outs).to(xs.dtype) if outs else xs.new_zeros(0, n_out)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{ids[:, k]}(x), each expert a SwiGLU MLP: permute, grouped GEMM gate_up with
    SwiGLU, grouped GEMM down, un-permute weighted. x [N, D], weights/expert_ids [N, K], gate_up_proj [E, 2I, D],
    down_proj [E, D, I] -> [N, D] in x's dtype, float32 inside; differentiable (torch.autograd) in x, weights
    and both projections."""
    xs, _, inverse, offsets = moe_permute(x, expert_ids, gate_up_proj.shape[0])
    h = grouped_gemm(xs, gate_up_proj, offsets, swiglu=True)
    return moe_unpermute(grouped_gemm(h, down_proj, offsets), inverse, weights.to(x.dtype))

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant c, without any int64 overflow: c is
    split into 16-bit halves, so no product exceeds 2**48 (signed overflow is undefined on some backends)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (the lowbias32 finalizer) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds [B] int64 (any value, 63 bits used), positions [B] int64 -> each row's 32-bit key [B] (int64),
    from which `counter_uniform` draws one number per token."""
    seeds, positions = seeds.to(torch.int64), positions.to(torch.int64)
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _mix32(_mix32(_mix32(lo ^ 0x243F6A88) ^ hi) ^ (positions & _MASK32))


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds [B] int64 (any value, 63 bits used), positions [B] int64 -> uniforms [B, V] float32 in (0, 1).

    Element (b, v) is a function of (seeds[b], positions[b], v) alone: the same whatever else is in the batch,
    with no generator state. Tensors in, tensors out; every op is elementwise (graph-capturable)."""
    return uniform_from_keys(counter_row_keys(seeds, positions), vocab_size)


def uniform_from_keys(row_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """row_keys [B] (`counter_row_keys`) -> uniforms [B, V] float32 in (0, 1), one per (row, token)."""
    v = torch.arange(vocab_size, device=row_keys.device, dtype=torch.int64)
    x = _mix32(_mix32(row_keys[:, None] ^ _mul32(v, 0x9E3779B9)[None, :]) ^ 0x85A308D3)  # [B, V]
    # The top 24 bits, centred in their bin: exactly representable in float32, never 0 or 1.
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def counter_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seeds [B], positions [B] -> Exp(1) noise [B, V] (float32), keyed as in `counter_uniform`."""
    return -torch.log(counter_uniform(seeds, positions, vocab_size))


def counter_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                   greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The counter sampler without filters: logits [B, V], temperature [B] (positive), seeds and positions [B]
    int64 (each row's stream seed and the index of the token it draws: `counter_row_keys`), greedy [B] bool ->
    tokens [B] int64 and their log-probs [B] float32 under
    log_softmax(logits / temperature). A sampled row takes argmax(z - log E) over z = logits / temperature and
    E = -log(u) its counter noise (the exponential race argmax(p / E), in logs); a greedy row argmax(z)."""
    z = logits.float() / temperature[:, None]
    lse = torch.logsumexp(z, dim=-1)
    u = uniform_from_keys(counter_row_keys(seeds, positions), z.shape[1])
    key = torch.where(greedy[:, None], z, z - torch.log(-torch.log(u)))
    tokens = key.argmax(dim=-1)
    return tokens, z.gather(1, tokens[:, None])[:, 0] - lse
