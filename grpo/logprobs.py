"""Per-token log-probabilities (and entropies) of the completion tokens from the final hidden states,
computed a chunk of tokens at a time so the [tokens, vocabulary] logits are never held for the whole batch,
neither in the forward nor in the backward (which recomputes each chunk's logits)."""

from __future__ import annotations

import torch

from model import kernels

#: Tokens per chunk: the chunk's logits and their softmax take about 3 x chunk_size x V x 4 bytes
#: (V = 129280 and 1024 tokens: about 1.6 GB) at the peak of the backward.
CHUNK_SIZE = 1024


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 weights: the softmax's precision."""
    return torch.promote_types(weight.dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """[n, D] x [V, D] -> [n, V] logits / temperature: the matmul in the weight's dtype, then, as the
    rollout sampler does, float32 and the temperature."""
    return (hidden @ weight.T).to(_compute_dtype(weight)) / temperature


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ W.T / temperature)[targets] and the softmax's entropy, chunk by chunk, with a
    backward that recomputes each chunk's logits instead of keeping them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):
        n, dtype = hidden.shape[0], _compute_dtype(weight)
        logprobs = torch.empty(n, dtype=dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=hidden.device)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, temperature)
            lse[rows] = torch.logsumexp(z, dim=-1)
            logprobs[rows] = z.gather(1, targets[rows, None])[:, 0] - lse[rows]
            if with_entropy:
                p = torch.exp(z - lse[rows, None])
                entropy[rows] = lse[rows] - (p * z).sum(dim=-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logprobs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # accumulated over chunks in float32 (it is the gradient itself when the weight is float32)
        grad_weight = (
            torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        )
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            log_p = _chunk_logits(h, weight, temperature) - lse[rows, None]
            p = torch.exp(log_p)
            # d log p_y / d z_k = [k = y] - p_k ;  d H / d z_k = -p_k (log p_k + H)
            grad_z = torch.zeros_like(p)
            if grad_logprobs is not None:
                g = grad_logprobs[rows, None].to(p.dtype)
                grad_z -= p * g
                grad_z.scatter_add_(1, targets[rows, None], g)
            if grad_entropy is not None:
                ent = -(p * log_p).sum(dim=-1, keepdim=True)
                grad_z -= grad_entropy[rows, None].to(p.dtype) * p * (log_p + ent)
            grad_z = (grad_z / temperature).to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = (grad_z @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_z.T @ h.to(weight.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _kernel_chosen(device: torch.device, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether `model.kernels` picks a Triton LM-head path ("chunked_triton" or the fused "triton") for
    tensors on `device` of these dtypes (both paths need one dtype for hidden and weight)."""
    try:
        chosen = kernels.select_impl(device, hidden_dtype, entry="lm_head")
    except ValueError:  # R1_GRPO_KERNELS=cpu, meant for the decode kernels: this one has no C++ op
        return False
    return chosen != "reference" and hidden_dtype == weight_dtype


def _autocast_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast is on for these tensors' device and would lower their matmul, else None."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype == torch.float32 and hidden.dtype in (torch.float32, dtype) else None


def _run(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if (
        hidden.shape[:-1] != targets.shape
        or lm_head_weight.dim() != 2
        or hidden.shape[-1] != lm_head_weight.shape[1]
    ):
        raise ValueError(
            f"need hidden [..., D], lm_head_weight [V, D] and targets [...], got {tuple(hidden.shape)}, "
            f"{tuple(lm_head_weight.shape)} and {tuple(targets.shape)}"
        )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    autocast = _autocast_dtype(hidden, lm_head_weight)
    if autocast is not None and _kernel_chosen(hidden.device, autocast, autocast):
        # Under autocast (model.dtype: bfloat16 over float32 master weights) the reference's matmul runs in
        # the autocast dtype; the Triton paths get their inputs in it too, or their matmuls would run in float32
        # (about 10x slower on a GPU). The cast is differentiable: d(W) reaches the float32 weight.
        flat_hidden, lm_head_weight = flat_hidden.to(autocast), lm_head_weight.to(autocast)
    if _kernel_chosen(hidden.device, flat_hidden.dtype, lm_head_weight.dtype):
        # model.kernels' Triton paths (CUDA; R1_GRPO_KERNELS forces one): "chunked_triton", the default, chunks
        # by a byte budget of logits (chunk_size does not apply) with cuBLAS matmuls; the fused "triton" holds
        # not even a chunk's logits. Elsewhere the chunks below.
        logprobs, entropy = kernels.lm_head_logprobs(flat_hidden, lm_head_weight, flat_targets, float(temperature),
                                                     with_entropy)
        entropy = entropy if with_entropy else logprobs.new_empty(0)
    else:
        logprobs, entropy = _ChunkedTokenLogprobs.apply(
            flat_hidden, lm_head_weight, flat_targets, float(temperature), int(chunk_size), with_entropy
        )
    return logprobs.view(targets.shape), entropy.view(targets.shape) if with_entropy else entropy


def token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Return log_softmax(hidden @ lm_head_weight.T / temperature) at `targets`, chunk by chunk.

    hidden:          [B, T, D] the model's last hidden states *after* the final norm (any leading
                     shape works); position t must be the one that predicts targets[:, t], so for
                     completions: hidden[:, prompt_len - 1 : -1] with targets = the completion ids.
    lm_head_weight:  [V, D] the output projection (`model.lm_head.weight`, tied or not).
    targets:         [B, T] token ids, all in [0, V): give padded positions any valid id (e.g. 0) and mask
                     them in the loss.
    temperature:     the sampling temperature: the log-probabilities are those the rollout sampled from
                     (logits in float32, then divided by the temperature).
    chunk_size:      tokens (over B * T) per chunk; memory is O(chunk_size * V) in the forward and backward.
    Returns [B, T] float32 (float64 for a float64 weight), differentiable with respect to hidden and lm_head_weight; equal to the
    unchunked computation in value and gradient (up to float rounding).
    """
    return _run(hidden, lm_head_weight, targets, temperature, chunk_size, False)[0]


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (`token_logprobs`, entropy), both [B, T] float32 (as `token_logprobs`) and differentiable; entropy is that of the
    whole temperature-scaled next-token distribution at each position: -sum_v p_v log p_v."""
    return _run(hidden, lm_head_weight, targets, temperature, chunk_size, True)
