"""Weight-absorbed MLA decode attention over the paged latent cache, in Triton (flash-decoding).

Each sequence's context is cut into a fixed number of splits; one program per (sequence, tile of heads,
split) reads its positions through the block table once, scores all heads of the tile against each
latent row (the nope part against q.W_UK, the rope part against q_pe) and keeps an online softmax; a small
second kernel merges the splits by their log-sum-exp. The grid depends only on B, H and the split count,
never on the lengths, so a step is free of host syncs and can be captured in a CUDA graph."""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, launcher, next_power_of_2, tl

# Launch shapes, measured on an H200 (bench/gpu_sweep.py, bf16, rank 512 + rope 64, block size 16):
# - few (sequence, head tile) pairs (a batch of 8 at 32k): split the context finely, 64-position tiles
#   (0.178 ms against 0.251 with the busy-batch shape);
# - many pairs (decode batches of 128+): fewer splits, 32-position tiles (0.135 ms at 128 x 1k, the best);
# - 64+ heads (V3's 128): 64 heads a program, 8 warps, so the latents are read by 2 programs, not 8 (0.65 ms
#   against 0.99 at 8 x 32k).
FEW_PAIRS = 32  # (sequence, head tile) pairs up to which the context is split finely
OVERRIDE: dict | None = None  # bench/gpu_sweep.py's variants: any of the keys `launch_config` returns


def launch_config(batch: int, n_heads: int) -> dict:
    """BLOCK_H (heads a program), BLOCK_N (positions a tile), NUM_WARPS and NUM_SPLITS, from B and H alone
    (a CUDA graph's grid must not depend on the lengths)."""
    block_h = 64 if n_heads >= 64 else 16  # tl.dot needs at least 16 rows
    pairs = batch * cdiv(n_heads, block_h)
    few = pairs <= FEW_PAIRS
    target, max_splits = (1024, 64) if few else (256, 16)
    config = dict(BLOCK_H=block_h, BLOCK_N=64 if few and block_h == 16 else 32, NUM_WARPS=8 if block_h == 64 else 4,
                  TARGET_PROGRAMS=target, MAX_SPLITS=max_splits)
    config.update(OVERRIDE or {})
    pairs = batch * cdiv(n_heads, config["BLOCK_H"])
    config["NUM_SPLITS"] = max(1, min(config["MAX_SPLITS"], config["TARGET_PROGRAMS"] // pairs))
    return config


@jit
def _split_kernel(q_ptr, pool_ptr, tables_ptr, lengths_ptr, part_out_ptr, part_lse_ptr, scale,
                  H, rank, rope_dim, block_size, stride_qb, stride_qh, stride_pool, stride_tb,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """One (sequence, head tile, split): part_out [B, H, NUM_SPLITS, BLOCK_R] float32 (normalized within the
    split), part_lse [B, H, NUM_SPLITS] float32 (-inf for an empty split)."""
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DR)
    h_ok = heads < H
    r_ok = offs_r < rank
    d_ok = offs_d < rope_dim
    q_row = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_nope = tl.load(q_row + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    q_pe = tl.load(q_row + rank + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0)

    length = tl.load(lengths_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, length)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_ok = pos < end
        block = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + pos // block_size, mask=p_ok, other=0)
        row = pool_ptr + (block.to(tl.int64) * block_size + pos % block_size)[:, None] * stride_pool
        kv = tl.load(row + offs_r[None, :], mask=p_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        k_pe = tl.load(row + rank + offs_d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q_nope, tl.trans(kv), input_precision=PRECISION)
        s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=PRECISION) * scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(p_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: every tile holds a position < end
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(kv.dtype), kv, acc=acc * alpha[:, None], input_precision=PRECISION)
        m = m_new

    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    part = (b.to(tl.int64) * H + heads) * NUM_SPLITS + split
    tl.store(part_out_ptr + part[:, None] * BLOCK_R + offs_r[None, :], out, mask=h_ok[:, None])
    tl.store(part_lse_ptr + part, lse, mask=h_ok)


@jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, rank, stride_ob, stride_oh, H,
                  BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """One (sequence, head): the splits weighted by exp(lse) -> out [B, H, rank] (zeros for an empty context)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_r = tl.arange(0, BLOCK_R)
    part = (b.to(tl.int64) * H + h) * NUM_SPLITS + offs_s
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m))  # all -inf: all 0
    total = tl.sum(w, axis=0)
    vals = tl.load(part_out_ptr + part[:, None] * BLOCK_R + offs_r[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(vals * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_r, out.to(out_ptr.dtype.element_ty),
             mask=offs_r < rank)


def block_sizes(rank: int, rope_dim: int) -> tuple[int, int]:
    """The latent and rope tile widths (powers of two, at least 16 for tl.dot)."""
    return max(16, next_power_of_2(rank)), max(16, next_power_of_2(rope_dim))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 inputs are multiplied in full float32 (no TF32), as the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_latent_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
                           block_size: int, rank: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """See `model.kernels.paged_latent_attention`; the Triton path."""
    B, H, R = q.shape
    q = q.contiguous()
    if pool.stride(1) != 1:
        pool = pool.contiguous()
    block_tables = block_tables.contiguous()
    config = launch_config(B, H)
    splits = config["NUM_SPLITS"] if splits is None else splits
    BLOCK_R, BLOCK_DR = block_sizes(rank, R - rank)
    part_out = torch.empty(B, H, splits, BLOCK_R, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, rank, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    launcher(_split_kernel, q.device)[(B, cdiv(H, config["BLOCK_H"]), splits)](
        q, pool, block_tables, lengths, part_out, part_lse, float(scale), H, rank, R - rank, block_size,
        q.stride(0), q.stride(1), pool.stride(0), block_tables.stride(0),
        BLOCK_H=config["BLOCK_H"], BLOCK_N=config["BLOCK_N"], BLOCK_R=BLOCK_R, BLOCK_DR=BLOCK_DR, NUM_SPLITS=splits,
        PRECISION=precision(q.dtype), num_warps=config["NUM_WARPS"])
    launcher(_merge_kernel, q.device)[(B, H)](
        part_out, part_lse, out, rank, out.stride(0), out.stride(1), H,
        BLOCK_R=BLOCK_R, NUM_SPLITS=splits, SPLITS_P2=next_power_of_2(splits))
    return out
