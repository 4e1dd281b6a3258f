"""Per-token log-probabilities (and entropies) through the LM head in Triton, never holding the [N, V]
logits: the forward streams the vocabulary in tiles with an online log-sum-exp; the backward recomputes
each tile of logits from the saved log-sum-exp and accumulates d(hidden) and d(W) without atomics
(one kernel owns rows of d(hidden), another owns rows of d(W))."""

from __future__ import annotations

import torch

from ._triton import cdiv, jit, launcher, tl

# Tiles measured on an H200 (bench/gpu_sweep.py: 16k tokens x vocab 129,280 x 2048, bf16, forward + backward):
# 128 x 128 x 64 with 8 warps, 315 ms against 463 for 64 x 64 x 64 with 4.
BLOCK_M = 128  # tokens per tile
BLOCK_V = 128  # vocabulary entries per tile
BLOCK_D = 64  # hidden features per step of the logits' reduction
TARGET_PROGRAMS = 512  # the forward splits the vocabulary until about this many programs run
NUM_WARPS = 8


@jit
def _logits_tile(h_ptr, w_ptr, rows, cols, D, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """hidden[rows] @ W[cols].T [BLOCK_M, BLOCK_V] in float32 (rows and cols out of range read zeros)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + d[None, :], mask=d[None, :] < D, other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + d[None, :], mask=d[None, :] < D, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc=acc, input_precision=PRECISION)
    return acc


@jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, inv_t_ptr, m_ptr, l_ptr, s_ptr, tz_ptr, N, V, D, cols_per_split,
                    stride_h, stride_w, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    """One (row tile, vocabulary split): over its columns z = h.W^T / t, the running max m, sum l of exp(z - m),
    sum s of exp(z - m) z and the target's z (0 if not in the split), each [splits, N] float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    r_ok = rows < N
    safe_rows = tl.where(r_ok, rows, 0)
    target = tl.load(targets_ptr + safe_rows)
    inv_t = tl.load(inv_t_ptr + safe_rows)
    v_start = split * cols_per_split
    v_end = tl.minimum(v_start + cols_per_split, V)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    tz = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        c_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, safe_rows, tl.where(c_ok, cols, 0), D, stride_h, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_D, PRECISION) * inv_t[:, None]
        z = tl.where(c_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        s = s * alpha + tl.sum(p * tl.where(c_ok[None, :], z, 0.0), axis=1)
        tz += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=r_ok)
    tl.store(l_ptr + out, l, mask=r_ok)
    tl.store(s_ptr + out, s, mask=r_ok)
    tl.store(tz_ptr + out, tz, mask=r_ok)


@jit
def _grad_logits_tile(h_ptr, w_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, rows, cols,
                      r_ok, c_ok, D, stride_h, stride_w, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_G_LP: tl.constexpr,
                      HAS_G_ENT: tl.constexpr):
    """d loss / d (h.W^T) on a tile [BLOCK_M, BLOCK_V] float32: (g_lp ([v = y] - p) - g_ent p (log p + H)) / t,
    zero outside the rows and columns."""
    inv_t = tl.load(inv_t_ptr + rows, mask=r_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=r_ok, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, D, stride_h, stride_w, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION)
    log_p = z * inv_t[:, None] - lse[:, None]
    p = tl.exp(log_p)
    g = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + rows, mask=r_ok, other=0.0)
        target = tl.load(targets_ptr + rows, mask=r_ok, other=-1)
        g += g_lp[:, None] * (tl.where(cols[None, :] == target[:, None], 1.0, 0.0) - p)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + rows, mask=r_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=r_ok, other=0.0)
        g -= g_ent[:, None] * p * (log_p + ent[:, None])
    g = g * inv_t[:, None]
    return tl.where(r_ok[:, None] & c_ok[None, :], g, 0.0)


@jit
def _grad_hidden_kernel(h_ptr, w_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, dh_ptr,
                        N, V, D, stride_h, stride_w, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_G_LP: tl.constexpr,
                        HAS_G_ENT: tl.constexpr):
    """One row tile owns dh[rows] [BLOCK_M, D] float32 (zeroed before): sum over vocabulary tiles of g @ W[cols]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < N
    rows = tl.where(r_ok, rows, 0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        c_ok = cols < V
        cols = tl.where(c_ok, cols, 0)
        g = _grad_logits_tile(h_ptr, w_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, rows,
                              cols, r_ok, c_ok, D, stride_h, stride_w, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION,
                              HAS_G_LP, HAS_G_ENT)
        g = g.to(w_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + d[None, :], mask=d[None, :] < D, other=0.0)
            out = dh_ptr + rows[:, None].to(tl.int64) * D + d[None, :]
            o_ok = r_ok[:, None] & (d[None, :] < D)
            dh = tl.load(out, mask=o_ok, other=0.0)
            tl.store(out, tl.dot(g, w, acc=dh, input_precision=PRECISION), mask=o_ok)


@jit
def _grad_weight_kernel(h_ptr, w_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, dw_ptr,
                        N, V, D, stride_h, stride_w, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, HAS_G_LP: tl.constexpr,
                        HAS_G_ENT: tl.constexpr):
    """One vocabulary tile owns dW[cols] [BLOCK_V, D] float32 (zeroed before): sum over row tiles of g.T @ h[rows]."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    c_ok = cols < V
    cols = tl.where(c_ok, cols, 0)
    for m0 in range(0, N, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        r_ok = rows < N
        rows = tl.where(r_ok, rows, 0)
        g = _grad_logits_tile(h_ptr, w_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, rows,
                              cols, r_ok, c_ok, D, stride_h, stride_w, BLOCK_M, BLOCK_V, BLOCK_D, PRECISION,
                              HAS_G_LP, HAS_G_ENT)
        g_t = tl.trans(g.to(h_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_M]
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + d[None, :], mask=d[None, :] < D, other=0.0)
            out = dw_ptr + cols[:, None].to(tl.int64) * D + d[None, :]
            o_ok = c_ok[:, None] & (d[None, :] < D)
            dw = tl.load(out, mask=o_ok, other=0.0)
            tl.store(out, tl.dot(g_t, h, acc=dw, input_precision=PRECISION), mask=o_ok)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(hidden, weight, targets, inv_t, splits: int | None = None):
    N, D = hidden.shape
    V = weight.shape[0]
    if splits is None:
        splits = max(1, min(cdiv(V, BLOCK_V), TARGET_PROGRAMS // max(1, cdiv(N, BLOCK_M))))
    cols_per_split = cdiv(cdiv(V, splits), BLOCK_V) * BLOCK_V
    splits = cdiv(V, cols_per_split)
    m, l, s, tz = torch.empty(4, splits, N, dtype=torch.float32, device=hidden.device).unbind(0)
    launcher(_forward_kernel, hidden.device)[(cdiv(N, BLOCK_M), splits)](
        hidden, weight, targets, inv_t, m, l, s, tz, N, V, D, cols_per_split, hidden.stride(0), weight.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, PRECISION=_precision(hidden.dtype), num_warps=NUM_WARPS)
    top = m.max(dim=0).values
    scale = torch.exp(m - top)
    total = (l * scale).sum(dim=0)
    lse = top + torch.log(total)
    entropy = lse - (s * scale).sum(dim=0) / total
    return tz.sum(dim=0) - lse, entropy, lse


class LMHeadLogprobs(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], targets [N] int64, inv_temperature [N] float32) -> logprobs [N],
    entropy [N], lse [N] float32; differentiable in hidden and weight (lse is not)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t):
        logprobs, entropy, lse = _forward(hidden, weight, targets, inv_t)
        ctx.save_for_backward(hidden, weight, targets, inv_t, lse, entropy)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        hidden, weight, targets, inv_t, lse, entropy = ctx.saved_tensors
        if g_lp is None and g_ent is None:
            return None, None, None, None
        N, D = hidden.shape
        V = weight.shape[0]
        dummy = lse.new_zeros(1)
        args = (hidden, weight, targets, inv_t, lse, entropy,
                dummy if g_lp is None else g_lp.float().contiguous(),
                dummy if g_ent is None else g_ent.float().contiguous())
        meta = dict(BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, PRECISION=_precision(hidden.dtype),
                    HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None, num_warps=NUM_WARPS)
        dh = dw = None
        if ctx.needs_input_grad[0]:
            dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
            launcher(_grad_hidden_kernel, hidden.device)[(cdiv(N, BLOCK_M),)](
                *args, dh, N, V, D, hidden.stride(0), weight.stride(0), **meta)
            dh = dh.to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros(V, D, dtype=torch.float32, device=weight.device)
            launcher(_grad_weight_kernel, hidden.device)[(cdiv(V, BLOCK_V),)](
                *args, dw, N, V, D, hidden.stride(0), weight.stride(0), **meta)
            dw = dw.to(weight.dtype)
        return dh, dw, None, None


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `model.kernels.lm_head_logprobs`; the Triton path over flat [N, D] rows."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return LMHeadLogprobs.apply(hidden, weight, targets.contiguous(), inv_t.contiguous())
