"""Per-token log-probabilities (and entropies) through the LM head with cuBLAS for the matmuls and Triton for
the rows: a chunk of tokens at a time, the chunk's logits [n, V] come from torch's matmul and one row kernel
turns them into log-sum-exp, target log-prob and entropy; the backward recomputes each chunk's logits, a row
kernel overwrites them with d loss / d logits, and two more matmuls give d(hidden) and d(W). Memory: one
[n, V] buffer (`LOGITS_BYTES`) and a float32 d(W), never the [N, V] logits. The fused kernel (lm_head.py) holds
less, but its own tl.dot loops took 315 ms on an H200 where the unfused PyTorch path's cuBLAS matmuls took 110
(16k tokens x 129,280 x 2048, bf16, forward + backward); this path's time there is not yet measured."""

from __future__ import annotations

import torch

from ._triton import jit, launcher, tl

#: Bytes of one chunk's logits: the rows per chunk are LOGITS_BYTES // (V x element size) (V = 129,280 in
#: bfloat16: 4,096 tokens a chunk), large enough that each matmul fills the GPU.
LOGITS_BYTES = 1 << 30
BLOCK_V = 4096  # vocabulary entries per step of a row (not yet tuned on a GPU)
NUM_WARPS = 8


@jit
def _row_forward_kernel(z_ptr, targets_ptr, inv_t_ptr, logprobs_ptr, entropy_ptr, lse_ptr, V, stride_z,
                        BLOCK_V: tl.constexpr):
    """One row of a chunk's logits z [n, V] (the matmul's dtype): with x = z / t in float32, its log-sum-exp,
    x[target] - lse and the entropy lse - sum softmax(x) x, one online pass over the row."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    inv_t = tl.load(inv_t_ptr + row)
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    s = tl.zeros([1], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite from the first tile on: column 0 is always there
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        s = s * alpha + tl.sum(p * tl.where(ok, x, 0.0), axis=0)  # padding: p = 0 but x = -inf
        m = m_new
    lse = m + tl.log(l)
    target = tl.load(targets_ptr + row)
    x_target = tl.load(z_row + target).to(tl.float32) * inv_t
    one = tl.arange(0, 1)
    tl.store(lse_ptr + row + one, lse)
    tl.store(logprobs_ptr + row + one, x_target - lse)
    tl.store(entropy_ptr + row + one, lse - s / l)


@jit
def _row_backward_kernel(z_ptr, targets_ptr, inv_t_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, V, stride_z,
                         BLOCK_V: tl.constexpr, HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr):
    """One row of recomputed logits z [n, V], overwritten in place with d loss / d z in z's dtype:
    (g_lp ([v = y] - p) - g_ent p (log p + H)) / t, p = softmax(z / t) from the saved log-sum-exp."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    inv_t = tl.load(inv_t_ptr + row)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row)
    g_lp = tl.load(g_lp_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    ent = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        log_p = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_t - lse
        p = tl.exp(log_p)
        g = tl.zeros([BLOCK_V], tl.float32)
        if HAS_G_LP:
            g += g_lp * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_G_ENT:
            g -= g_ent * p * (log_p + ent)
        tl.store(z_row + cols, (g * inv_t).to(z_ptr.dtype.element_ty), mask=ok)


def chunk_rows(vocab: int, dtype: torch.dtype, logits_bytes: int | None = None) -> int:
    """Tokens per chunk so that a chunk's [rows, vocab] logits in `dtype` take at most `logits_bytes`
    (`LOGITS_BYTES` by default), at least one; a multiple of 64 where that many fit (whole matmul tiles)."""
    budget = LOGITS_BYTES if logits_bytes is None else logits_bytes
    rows = max(1, budget // (vocab * torch.empty(0, dtype=dtype).element_size()))
    return rows // 64 * 64 if rows >= 64 else rows


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc float32 and a, b in the compute dtype. For bfloat16/float16 on CUDA, cuBLAS adds its
    float32 result straight into acc where this torch's addmm takes out_dtype (rounding only at the end, like
    the fused kernel); elsewhere a matmul in a's dtype is added (one rounding per chunk)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # an older torch: no out_dtype, or not with a float32 `acc`
            pass
    acc += a @ b


def _forward(hidden, weight, targets, inv_t, rows):
    N = hidden.shape[0]
    V = weight.shape[0]
    # three tensors, not views of one: a caller may change an output in place
    logprobs, entropy, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
    z = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)
    kernel = launcher(_row_forward_kernel, hidden.device)
    for start in range(0, N, rows):
        end = min(start + rows, N)
        # the logits in the matmul's dtype, as the reference and the rollout's sampler round them
        zc = torch.mm(hidden[start:end], weight.T, out=z[:end - start])
        kernel[(end - start,)](zc, targets[start:end], inv_t[start:end], logprobs[start:end], entropy[start:end],
                               lse[start:end], V, zc.stride(0), BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return logprobs, entropy, lse


class ChunkedLMHeadLogprobs(torch.autograd.Function):
    """(hidden [N, D], weight [V, D], targets [N] int64, inv_temperature [N] float32, rows per chunk) ->
    logprobs [N], entropy [N], lse [N] float32; differentiable in hidden and weight (lse is not)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, rows):
        logprobs, entropy, lse = _forward(hidden, weight, targets, inv_t, rows)
        ctx.save_for_backward(hidden, weight, targets, inv_t, lse, entropy)
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_lse):
        hidden, weight, targets, inv_t, lse, entropy = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None
        N, V, rows = hidden.shape[0], weight.shape[0], ctx.rows
        # an output outside the loss has no gradient: the kernel skips its term (and reads the zeros given here)
        meta = dict(BLOCK_V=BLOCK_V, HAS_G_LP=g_lp is not None, HAS_G_ENT=g_ent is not None, num_warps=NUM_WARPS)
        g_lp = lse.new_zeros(N) if g_lp is None else g_lp.float().contiguous()
        g_ent = lse.new_zeros(N) if g_ent is None else g_ent.float().contiguous()
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        # d(W) summed over chunks in float32 and rounded once at the end
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        z = torch.empty(min(rows, N), V, dtype=hidden.dtype, device=hidden.device)
        kernel = launcher(_row_backward_kernel, hidden.device)
        for start in range(0, N, rows):
            end = min(start + rows, N)
            h = hidden[start:end]
            gz = torch.mm(h, weight.T, out=z[:end - start])  # the logits again, then their gradient in place
            kernel[(end - start,)](gz, targets[start:end], inv_t[start:end], lse[start:end], entropy[start:end],
                                   g_lp[start:end], g_ent[start:end], V, gz.stride(0), **meta)
            if need_h:
                torch.mm(gz, weight, out=dh[start:end])
            if need_w:
                _add_matmul_(dw, gz.T, h)
        del z, gz  # the chunk's buffer goes before d(W)'s copy in W's dtype is made
        if need_w:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: torch.Tensor,
                     logits_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `model.kernels.lm_head_logprobs`; the chunked path over flat [N, D] rows, `chunk_rows` tokens a chunk."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = chunk_rows(weight.shape[0], hidden.dtype, logits_bytes)
    return ChunkedLMHeadLogprobs.apply(hidden, weight, targets.contiguous(), inv_t.contiguous(), rows)
