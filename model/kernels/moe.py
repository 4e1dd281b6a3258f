"""MoE dispatch in Triton: token rows gathered into expert order (permute), a grouped GEMM over every
expert's rows in one launch (optionally fused with SiLU(gate) * up), and the rows gathered back to their
tokens with the routing weights (un-permute). Gathers only, no atomics; the expert offsets stay on the
device, the grid is sized from the shapes alone (at most cdiv(M, BLOCK_M) + E row tiles)."""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, launcher, tl
from .reference import permutation_plan

BLOCK_ROWS, BLOCK_COLS = 32, 64  # the gathers' tiles
# The grouped GEMM's tiles, measured on an H200 (bench/gpu_sweep.py, bf16, 64 experts top-6, 2048 -> 1408):
# 128 x 128 x 64 with 8 warps for training-sized row counts (SwiGLU 2.58 ms against 4.15 with 64 x 64 x 32 at
# 16k tokens; down 1.67 against 4.22), and 64 rows for the SwiGLU GEMM of decode batches (0.55 ms against 0.64
# at 128 tokens; its two accumulators make 128 rows slower there).
LARGE_ROWS = 4096  # rows (token, expert pairs) from which the training-sized tiles serve the SwiGLU GEMM
OVERRIDE: dict | None = None  # bench/gpu_sweep.py's variants: any of the keys `gemm_config` returns


def gemm_config(rows: int, swiglu: bool) -> dict:
    """BLOCK_M, BLOCK_N, BLOCK_K and NUM_WARPS of the grouped GEMM for `rows` rows (a shape, not a count read
    from the device, so a decode step's grid is fixed)."""
    config = dict(BLOCK_M=64 if swiglu and rows < LARGE_ROWS else 128, BLOCK_N=128, BLOCK_K=64, NUM_WARPS=8)
    config.update(OVERRIDE or {})
    return config


@jit
def _gather_rows_kernel(x_ptr, index_ptr, out_ptr, M, D, stride_x, stride_o,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[i] = x[index[i]]: out [M, D]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows < M)[:, None] & (cols < D)[None, :]
    src = tl.load(index_ptr + rows, mask=rows < M, other=0).to(tl.int64)
    vals = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], vals, mask=ok)


@jit
def _unpermute_kernel(ys_ptr, inverse_ptr, weights_ptr, out_ptr, N, D, K, stride_y, stride_o,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[n] = sum_k weights[n, k] * ys[inverse[n * K + k]] (float32 inside): out [N, D]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    r_ok = rows < N
    ok = r_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], tl.float32)
    for k in range(0, K):
        pair = rows.to(tl.int64) * K + k
        src = tl.load(inverse_ptr + pair, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(weights_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
        y = tl.load(ys_ptr + src[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@jit
def _grouped_gemm_kernel(x_ptr, w_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, out_ptr, N, K, I,
                         stride_x, stride_we, stride_wn, stride_o, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr):
    """One (row tile of one expert, column tile): out[rows] = x[rows] @ w[e].T, or with SWIGLU silu(gate) * up
    where gate = x @ w[e, :I].T and up = x @ w[e, I:].T. A tile past the last expert's rows does nothing."""
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rows = row_start + tl.arange(0, BLOCK_M)
    r_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    k_end = tl.where(row_end > row_start, K, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + e * stride_we
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + k[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc=acc, input_precision=PRECISION)
        if SWIGLU:
            w_up = tl.load(w_base + (cols[None, :] + I) * stride_wn + k[:, None], mask=c_ok[None, :] & k_ok[:, None],
                           other=0.0)
            acc_up = tl.dot(x, w_up, acc=acc_up, input_precision=PRECISION)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [R, D], index [M] -> x[index] [M, D]."""
    M, D = index.shape[0], x.shape[1]
    out = x.new_empty(M, D)
    if M and D:
        x = x if x.stride(1) == 1 else x.contiguous()
        launcher(_gather_rows_kernel, x.device)[(cdiv(M, BLOCK_ROWS), cdiv(D, BLOCK_COLS))](
            x, index, out, M, D, x.stride(0), out.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
    return out


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int):
    """See `model.kernels.moe_permute`; the sort in PyTorch (on the device), the row gather in Triton."""
    token_of, inverse, offsets = permutation_plan(expert_ids, n_experts)
    return gather_rows(x, token_of), token_of, inverse, offsets


def moe_unpermute(ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """See `model.kernels.moe_unpermute`."""
    N, K = weights.shape
    D = ys.shape[1]
    out = ys.new_empty(N, D)
    if N and D:
        ys = ys if ys.stride(1) == 1 else ys.contiguous()
        launcher(_unpermute_kernel, ys.device)[(cdiv(N, BLOCK_ROWS), cdiv(D, BLOCK_COLS))](
            ys, inverse, weights.contiguous(), out, N, D, K, ys.stride(0), out.stride(0),
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
    return out


def tile_plan(offsets: torch.Tensor, M: int, BLOCK_M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of BLOCK_M within each expert, worked out on the device: for each of the cdiv(M, BLOCK_M) + E
    possible tiles, its expert and its rows [start, end) (start = end = 0 past the last tile)."""
    E = offsets.shape[0] - 1
    offsets = offsets.long()
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tiles.cumsum(0)
    tile = torch.arange(cdiv(M, BLOCK_M) + E, device=offsets.device)
    expert = torch.searchsorted(tiles_end, tile, right=True).clamp(max=E - 1)
    used = tile < tiles_end[-1]
    start = offsets[expert] + (tile - (tiles_end[expert] - tiles[expert])) * BLOCK_M
    end = torch.minimum(start + BLOCK_M, offsets[expert + 1])
    return expert.to(torch.int32), torch.where(used, start, 0), torch.where(used, end, 0)


def grouped_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """See `model.kernels.grouped_gemm`."""
    M, K = xs.shape
    N = w.shape[1] // 2 if swiglu else w.shape[1]
    out = xs.new_empty(M, N)
    if M == 0 or N == 0:
        return out
    xs = xs if xs.stride(1) == 1 else xs.contiguous()
    w = w if w.stride(2) == 1 else w.contiguous()
    config = gemm_config(M, swiglu)
    expert, start, end = tile_plan(offsets, M, config["BLOCK_M"])
    launcher(_grouped_gemm_kernel, xs.device)[(expert.shape[0], cdiv(N, config["BLOCK_N"]))](
        xs, w, expert, start, end, out, N, K, N, xs.stride(0), w.stride(0), w.stride(1), out.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], SWIGLU=swiglu,
        PRECISION="ieee" if xs.dtype == torch.float32 else "tf32", num_warps=config["NUM_WARPS"])
    return out
