"""The counter sampler in one pass over the logits, in Triton: per row, its key from its seed and position,
the log-sum-exp (online), the counter noise of every token (the same 32-bit hash as `reference.uniform_from_keys`, in uint32 arithmetic)
and the running argmax of z - log(E), so a [B, V] row of logits is read once and nothing of size [B, V] is
written. The PyTorch version of the same draw (`reference.counter_sample`) makes some thirty [B, V] int64
passes; on a GPU at V = 102,400 and B = 128 that is milliseconds per decode step."""

from __future__ import annotations

import torch

from ._triton import jit, launcher, tl

BLOCK_V = 1024
NUM_WARPS = 4


@jit
def _mix32(x):
    """lowbias32 on uint32 (wrapping multiplies)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D).to(tl.uint32)  # the cast keeps the low 32 bits whatever type the literal promoted to
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B).to(tl.uint32)
    return x ^ (x >> 16)


@jit
def _sample_kernel(logits_ptr, temperature_ptr, seeds_ptr, positions_ptr, greedy_ptr, tokens_ptr, logprobs_ptr, V,
                   stride_l, BLOCK_V: tl.constexpr):
    """One row: tokens[b] = argmax over v of key(v), logprobs[b] = z[token] - logsumexp(z), z = logits / t."""
    b = tl.program_id(0)
    t = tl.load(temperature_ptr + b)
    seed = tl.load(seeds_ptr + b)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    position = (tl.load(positions_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
    row_key = _mix32(_mix32(_mix32(lo ^ 0x243F6A88) ^ hi) ^ position)  # `reference.counter_row_keys`
    greedy = tl.load(greedy_ptr + b) != 0
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    best_key = tl.full([1], float("-inf"), tl.float32)
    best_z = tl.zeros([1], tl.float32)
    best_v = tl.zeros([1], tl.int32)
    offs = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        ok = v < V
        z = tl.load(logits_ptr + b.to(tl.int64) * stride_l + v, mask=ok, other=float("-inf")).to(tl.float32) / t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all -inf prefix adds nothing (no nan)
        l = l * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
        x = _mix32(_mix32(row_key ^ (v.to(tl.uint32) * 0x9E3779B9).to(tl.uint32)) ^ 0x85A308D3)
        u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        key = tl.where(greedy, z, z - tl.log(-tl.log(u)))
        key = tl.where(ok, key, float("-inf"))
        tile_best = tl.max(key, axis=0)
        tile_v = tl.argmax(key, axis=0)
        tile_z = tl.sum(tl.where(offs == tile_v, z, 0.0), axis=0)
        better = tile_best > best_key  # strict: the first of equal keys wins, as torch.argmax
        best_key = tl.where(better, tile_best, best_key)
        best_v = tl.where(better, v0 + tile_v, best_v)
        best_z = tl.where(better, tile_z, best_z)
    lse = m + tl.log(l)
    one = tl.arange(0, 1)
    tl.store(tokens_ptr + b + one, best_v.to(tl.int64))
    tl.store(logprobs_ptr + b + one, best_z - lse)


def counter_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                   greedy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """See `model.kernels.counter_sample`; the Triton path."""
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logprobs
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    launcher(_sample_kernel, logits.device)[(B,)](
        logits, temperature.float().contiguous(), seeds.to(torch.int64).contiguous(),
        positions.to(torch.int64).contiguous(), greedy.to(torch.int8).contiguous(), tokens, logprobs, V,
        logits.stride(0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return tokens, logprobs
