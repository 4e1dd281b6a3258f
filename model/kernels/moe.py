"""MoE dispatch in Triton: token rows gathered into expert order (permute), a grouped GEMM over every
expert's rows in one launch (optionally fused with SiLU(gate) * up), and the rows gathered back to their
tokens with the routing weights (un-permute). Gathers only, no atomics; the expert offsets stay on the
device, the grid is sized from the shapes alone (at most cdiv(M, BLOCK_M) + E row tiles).

For training, `RoutedExperts` (an autograd.Function) adds the backward: the grouped GEMM against the
transposed weights for the inputs' gradients, a grouped "X^T dY" per expert for the weights' gradients,
the SwiGLU backward, and the permutation's backward as gathers."""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, launcher, tl
from .reference import pair_order, permutation_plan

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
OUTER_BLOCK_P, OUTER_BLOCK_Q, OUTER_BLOCK_R = 64, 64, 32  # the weights' gradient: output tile, rows a step
OUTER_NUM_WARPS = 4


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
                         stride_x, stride_we, stride_wn, stride_wk, stride_o, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr, PRECISION: tl.constexpr):
    """One (row tile of one expert, column tile): out[rows] = x[rows] @ w[e].T, or with SWIGLU silu(gate) * up
    where gate = x @ w[e, :I].T and up = x @ w[e, I:].T; w[e] is read as [N, K] through its strides (stride_wk 1:
    nn.Linear's layout; stride_wn 1: the transposed matrix, as the backward multiplies). A tile past the last
    expert's rows does nothing."""
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
        w = tl.load(w_base + cols[None, :] * stride_wn + k[:, None] * stride_wk, mask=c_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(x, w, acc=acc, input_precision=PRECISION)
        if SWIGLU:
            w_up = tl.load(w_base + (cols[None, :] + I) * stride_wn + k[:, None] * stride_wk,
                           mask=c_ok[None, :] & k_ok[:, None], other=0.0)
            acc_up = tl.dot(x, w_up, acc=acc_up, input_precision=PRECISION)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


@jit
def _grouped_outer_kernel(a_ptr, b_ptr, offsets_ptr, out_ptr, P, Q, stride_a, stride_b, stride_oe, stride_op,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
                          PRECISION: tl.constexpr):
    """One (expert, P tile, Q tile) owns out[e, p, q] = sum over expert e's rows r of a[r, p] b[r, q], the
    weights' gradient a_e^T b_e (float32 inside; zeros for an expert with no rows). The rows come from the
    device-side offsets: nothing is read back to the host."""
    e = tl.program_id(0)
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = p < P
    q_ok = q < Q
    acc = tl.zeros([BLOCK_P, BLOCK_Q], tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < row_end
        a_t = tl.load(a_ptr + r[None, :].to(tl.int64) * stride_a + p[:, None], mask=p_ok[:, None] & r_ok[None, :],
                      other=0.0)  # [BLOCK_P, BLOCK_R]
        b = tl.load(b_ptr + r[:, None].to(tl.int64) * stride_b + q[None, :], mask=r_ok[:, None] & q_ok[None, :],
                    other=0.0)
        acc = tl.dot(a_t, b, acc=acc, input_precision=PRECISION)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + p[:, None].to(tl.int64) * stride_op + q[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@jit
def _swiglu_kernel(gu_ptr, h_ptr, M, I, stride_gu, stride_h, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """h = silu(gate) * up, gate = gu[:, :I], up = gu[:, I:] (float32 inside): h [M, I]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows < M)[:, None] & (cols < I)[None, :]
    src = gu_ptr + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    gate = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(src + I, mask=ok, other=0.0).to(tl.float32)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :],
             (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty), mask=ok)


@jit
def _swiglu_backward_kernel(gu_ptr, dh_ptr, dgu_ptr, h_ptr, M, I, stride_gu, stride_dh, stride_h,
                            BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """From dh = d loss / d h: dgu = [dh up silu'(gate), dh silu(gate)] [M, 2I] (silu'(g) = s (1 + g (1 - s)),
    s = sigmoid(g)), and h = silu(gate) * up [M, I] again, for the down projection's weight gradient."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    ok = (rows < M)[:, None] & (cols < I)[None, :]
    at = rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    gate = tl.load(gu_ptr + at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + at + I, mask=ok, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * stride_dh + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    silu = gate * s
    tl.store(dgu_ptr + at, (dh * up * s * (1.0 + gate * (1.0 - s))).to(dgu_ptr.dtype.element_ty), mask=ok)
    tl.store(dgu_ptr + at + I, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=ok)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_h + cols[None, :], (silu * up).to(h_ptr.dtype.element_ty),
             mask=ok)


@jit
def _permute_grad_kernel(g_ptr, order_ptr, weights_ptr, out_ptr, M, D, K, stride_g, stride_o,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The un-permute's backward for the expert rows, a gather: out[r] = weights[p] * g[p // K] with p = order[r]
    the (token, k) pair in row r (float32 inside): out [M, D]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    r_ok = rows < M
    ok = r_ok[:, None] & (cols < D)[None, :]
    pair = tl.load(order_ptr + rows, mask=r_ok, other=0).to(tl.int64)
    w = tl.load(weights_ptr + pair, mask=r_ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (pair // K)[:, None] * stride_g + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], (w[:, None] * g).to(
        out_ptr.dtype.element_ty), mask=ok)


@jit
def _weights_grad_kernel(g_ptr, ys_ptr, inverse_ptr, out_ptr, N, D, K, stride_g, stride_y,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The routing weights' gradient, one (token tile, k) a program: out[n, k] = g[n] . ys[inverse[n * K + k]]
    (float32): out [N, K]."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    k = tl.program_id(1)
    r_ok = rows < N
    pair = rows.to(tl.int64) * K + k
    src = tl.load(inverse_ptr + pair, mask=r_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_ROWS], tl.float32)
    for d0 in range(0, D, BLOCK_COLS):
        cols = d0 + tl.arange(0, BLOCK_COLS)
        ok = r_ok[:, None] & (cols < D)[None, :]
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * stride_g + cols[None, :], mask=ok, other=0.0)
        y = tl.load(ys_ptr + src[:, None] * stride_y + cols[None, :], mask=ok, other=0.0)
        acc += tl.sum(g.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + pair, acc, mask=r_ok)


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


def grouped_gemm(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, swiglu: bool = False,
                 transpose_w: bool = True) -> torch.Tensor:
    """See `model.kernels.grouped_gemm`. transpose_w=False multiplies by w[e] itself: w [E, K, N] -> xs_e @ w_e
    (the backward's d(input) = d(output) @ W, read in place through the strides, never copied)."""
    M, K = xs.shape
    n_w = w.shape[1] if transpose_w else w.shape[2]
    N = n_w // 2 if swiglu else n_w
    out = xs.new_empty(M, N)
    if M == 0 or N == 0:
        return out
    xs = xs if xs.stride(1) == 1 else xs.contiguous()
    stride_wn, stride_wk = (w.stride(1), w.stride(2)) if transpose_w else (w.stride(2), w.stride(1))
    config = gemm_config(M, swiglu)
    expert, start, end = tile_plan(offsets, M, config["BLOCK_M"])
    launcher(_grouped_gemm_kernel, xs.device)[(expert.shape[0], cdiv(N, config["BLOCK_N"]))](
        xs, w, expert, start, end, out, N, K, N, xs.stride(0), w.stride(0), stride_wn, stride_wk, out.stride(0),
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], SWIGLU=swiglu,
        PRECISION=precision(xs.dtype), num_warps=config["NUM_WARPS"])
    return out


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact float32 products for float32, else the tensor cores' own."""
    return "ieee" if dtype == torch.float32 else "tf32"


def grouped_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per expert a_e^T b_e over its rows: a [M, P], b [M, Q] in expert order, offsets [E + 1] -> [E, P, Q] in
    out_dtype (zeros for an expert with no rows): the weights' gradient of a grouped GEMM."""
    E, P, Q = offsets.shape[0] - 1, a.shape[1], b.shape[1]
    out = torch.empty(E, P, Q, dtype=out_dtype, device=a.device)
    if out.numel():
        a = a if a.stride(1) == 1 else a.contiguous()
        b = b if b.stride(1) == 1 else b.contiguous()
        launcher(_grouped_outer_kernel, a.device)[(E, cdiv(P, OUTER_BLOCK_P), cdiv(Q, OUTER_BLOCK_Q))](
            a, b, offsets, out, P, Q, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
            BLOCK_P=OUTER_BLOCK_P, BLOCK_Q=OUTER_BLOCK_Q, BLOCK_R=OUTER_BLOCK_R, PRECISION=precision(a.dtype),
            num_warps=OUTER_NUM_WARPS)
    return out


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2I] (gate, then up) -> silu(gate) * up [M, I]."""
    M, I = gu.shape[0], gu.shape[1] // 2
    h = gu.new_empty(M, I)
    if M and I:
        launcher(_swiglu_kernel, gu.device)[(cdiv(M, BLOCK_ROWS), cdiv(I, BLOCK_COLS))](
            gu, h, M, I, gu.stride(0), h.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
    return h


def swiglu_backward(gu: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gu [M, 2I] (the forward's pre-activations), dh [M, I] -> d gu [M, 2I] and h = silu(gate) * up [M, I]."""
    M, I = dh.shape
    dgu, h = gu.new_empty(M, 2 * I), gu.new_empty(M, I)
    if M and I:
        dh = dh if dh.stride(1) == 1 else dh.contiguous()
        launcher(_swiglu_backward_kernel, gu.device)[(cdiv(M, BLOCK_ROWS), cdiv(I, BLOCK_COLS))](
            gu, dh, dgu, h, M, I, gu.stride(0), dh.stride(0), h.stride(0), BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=BLOCK_COLS)
    return dgu, h


def permute_grad(g: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """g [N, D] (d loss / d output), order [M] (each expert row's (token, k) pair), weights [N, K] ->
    d loss / d ys [M, D]: weights[n, k] * g[n] in row order, in g's dtype."""
    K, M, D = weights.shape[1], order.shape[0], g.shape[1]
    out = g.new_empty(M, D)
    if M and D:
        launcher(_permute_grad_kernel, g.device)[(cdiv(M, BLOCK_ROWS), cdiv(D, BLOCK_COLS))](
            g, order, weights.contiguous(), out, M, D, K, g.stride(0), out.stride(0), BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_COLS=BLOCK_COLS)
    return out


def weights_grad(g: torch.Tensor, ys: torch.Tensor, inverse: torch.Tensor, K: int) -> torch.Tensor:
    """g [N, D], ys [N*K, D] (the experts' rows), inverse [N*K] -> g[n] . ys[inverse[n*K + k]] [N, K] float32."""
    N, D = g.shape
    out = torch.zeros(N, K, dtype=torch.float32, device=g.device)
    if N and K and D:
        launcher(_weights_grad_kernel, g.device)[(cdiv(N, BLOCK_ROWS), K)](
            g, ys, inverse, out, N, D, K, g.stride(0), ys.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS)
    return out


GEMMS = ("triton", "grouped_mm")


def _mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool, gemm: str) -> torch.Tensor:
    """x_e @ w_e.T (transpose_w: w [E, N, K]) or x_e @ w_e (w [E, K, N]) per expert's rows -> [M, N]."""
    if gemm == "grouped_mm" and x.shape[0]:
        return torch._grouped_mm(x, w.transpose(1, 2) if transpose_w else w, offs=offsets[1:])
    return grouped_gemm(x, w, offsets, transpose_w=transpose_w)


def _outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, out_dtype: torch.dtype, gemm: str) -> torch.Tensor:
    """a_e^T b_e per expert -> [E, P, Q]."""
    if gemm == "grouped_mm" and a.shape[0]:
        return torch._grouped_mm(a.t(), b, offs=offsets[1:]).to(out_dtype)
    return grouped_outer(a, b, offsets, out_dtype)


class RoutedExperts(torch.autograd.Function):
    """(x [N, D], weights [N, K], expert_ids [N, K], gate_up_proj [E, 2I, D], down_proj [E, D, I], gemm) ->
    sum_k weights[:, k] * expert_{ids[:, k]}(x) [N, D], differentiable in x, weights and both projections.

    Forward: gather the rows into expert order, gu = xs_e @ gate_up_e.T, h = silu(gate) * up, ys = h_e @ down_e.T,
    gather back weighted. Backward, all from device-side offsets (no host read of the expert counts) and by
    gathers (no atomics): d ys = weights * g gathered into expert order; d weights = g . ys; d h = d ys_e @ down_e;
    the SwiGLU backward; d down_e = d ys_e^T h_e and d gate_up_e = d gu_e^T xs_e (grouped "X^T dY");
    d x = the K rows of d xs = d gu_e @ gate_up_e summed back per token. The matmuls run in Triton's grouped GEMM,
    or with gemm="grouped_mm" in torch._grouped_mm (bf16 on Hopper); everything else in Triton.
    Saves x, the pre-activations gu [N*K, 2I] and the expert outputs ys [N*K, D]; xs and h are recomputed."""

    @staticmethod
    def forward(ctx, x, weights, expert_ids, gate_up_proj, down_proj, gemm):
        K = expert_ids.shape[1]
        order, inverse, offsets = pair_order(expert_ids, gate_up_proj.shape[0])
        xs = gather_rows(x, order // K)
        gu = _mm(xs, gate_up_proj, offsets, True, gemm)
        ys = _mm(swiglu(gu), down_proj, offsets, True, gemm)
        ctx.save_for_backward(x, weights, gate_up_proj, down_proj, order, inverse, offsets, gu, ys)
        ctx.gemm = gemm
        return moe_unpermute(ys, inverse, weights)

    @staticmethod
    def backward(ctx, g):
        x, weights, gate_up_proj, down_proj, order, inverse, offsets, gu, ys = ctx.saved_tensors
        need_x, need_weights, _, need_gate_up, need_down, _ = ctx.needs_input_grad
        N, K = weights.shape
        g = g if g.stride(1) == 1 else g.contiguous()
        dweights = weights_grad(g, ys, inverse, K).to(weights.dtype) if need_weights else None
        dx = dgate_up = ddown = None
        if need_x or need_gate_up or need_down:
            dys = permute_grad(g, order, weights)
            dgu, h = swiglu_backward(gu, _mm(dys, down_proj, offsets, False, ctx.gemm))
            if need_down:
                ddown = _outer(dys, h, offsets, down_proj.dtype, ctx.gemm)
            if need_gate_up:
                dgate_up = _outer(dgu, gather_rows(x, order // K), offsets, gate_up_proj.dtype, ctx.gemm)
            if need_x:
                dxs = _mm(dgu, gate_up_proj, offsets, False, ctx.gemm)
                dx = moe_unpermute(dxs, inverse, torch.ones(N, K, dtype=torch.float32, device=x.device))
        return dx, dweights, None, dgate_up, ddown, None


def routed_experts(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, gate_up_proj: torch.Tensor,
                   down_proj: torch.Tensor, gemm: str = "triton") -> torch.Tensor:
    """See `model.kernels.routed_experts`: the differentiable path (`RoutedExperts`)."""
    if gemm not in GEMMS:
        raise ValueError(f"routed_experts: unknown gemm {gemm!r}; choose one of {GEMMS}")
    x = x if x.stride(1) == 1 else x.contiguous()
    return RoutedExperts.apply(x, weights.contiguous(), expert_ids, gate_up_proj, down_proj, gemm)
