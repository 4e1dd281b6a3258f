"""The GRPO policy loss: PPO's clipped surrogate with group-relative advantages, token-level or sequence-level
(GSPO) importance ratios, an optional KL penalty to the reference policy, an optional entropy bonus and a
truncated importance-sampling correction for rollout/trainer mismatch, aggregated as TRL's loss types.

Normalization across micro-batches and ranks (the contract the trainer follows)
-------------------------------------------------------------------------------
Every loss type is a sum over the call's valid tokens divided by a count of the *whole batch*:

    grpo:     sum_i (1/|y_i|) sum_t l_it / S          S = num_sequences_in_batch
    bnpo:     sum_i sum_t l_it / N                    N = num_items_in_batch (valid completion tokens)
    dapo:     sum_i sum_t l_it / N
    dr_grpo:  sum_i sum_t l_it / (S * max_completion_length)

The numerators add up over sequences, so when S and N count the global batch of one optimizer step (every
micro-batch on every rank), the losses of the calls *sum* to the loss of one call on the whole batch, and
so do their gradients. The trainer therefore:

1. before the step, counts S (sequences) and N (`mask.sum()`) over all its micro-batches, all-reduces
   both (sum) over the data-parallel ranks, and passes them to every call as `num_sequences_in_batch`
   and `num_items_in_batch`;
2. calls `.backward()` on each micro-batch's loss as it is: it does NOT divide by the number of
   gradient-accumulation steps;
3. where the gradient all-reduce averages over W ranks (DDP, FSDP), multiplies each loss by W before the
   backward (equivalently passes S / W and N / W, which is what TRL does for dapo).

Left as None, S and N are the call's own counts (B and `mask.sum()`): the call is then the whole batch.
With the global N, bnpo and dapo are the same estimator (DAPO's token-level mean over the batch); TRL's bnpo
normalizes by each micro-batch's own token count, which is bnpo here with num_items_in_batch=None, and
which makes the result depend on how the batch is cut into micro-batches.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Return a per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from the policy.

    logprobs, ref_logprobs: [B, T] log-probabilities of the sampled tokens under the policy and the
    reference. With d = ref_logprobs - logprobs (Schulman's approximations, as named in TRL and verl):
        k1 = logprobs - ref_logprobs = -d       unbiased, can be negative
        k2 = d**2 / 2                           biased, low variance
        k3 = exp(d) - d - 1                     unbiased, never negative (GRPO, DeepSeekMath eq. 4)
    Returns [B, T]; gradients flow into both arguments (detach the reference yourself, or let
    `policy_loss` do it).
    """
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


@torch.no_grad()
def truncated_is_weights(
    trainer_old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """Return truncated importance-sampling weights min(exp(old - rollout), cap), detached.

    trainer_old_logprobs: [B, T] the sampled tokens' log-probabilities recomputed by the trainer with the
    weights that generated them; rollout_logprobs: [B, T] the ones the rollout engine reported. The two
    differ by numerics (kernels, precision, batching); the weights re-weight the policy term of
    `policy_loss` (its `rollout_is_weights`) so it is an expectation under the trainer's old policy
    (truncated IS, "TIS"; TRL's `vllm_importance_sampling_cap`). Padded positions are ignored by the loss.
    """
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    return torch.exp(trainer_old_logprobs.float() - rollout_logprobs.float()).clamp(max=cap)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType,
    epsilon: float,
    epsilon_high: float | None = None,
    importance_sampling_level: ImportanceSamplingLevel = "token",
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    num_sequences_in_batch: int | float | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the GRPO loss of a (micro-)batch and its metrics.

    logprobs:       [B, T] log-probabilities of the completion tokens under the policy being trained
                    (differentiable). T is the padded completion length.
    old_logprobs:   [B, T] the same under the policy that sampled them (constants; with one update per
                    batch pass `logprobs.detach()`).
    advantages:     [B] one advantage per completion (`group_advantages`), constant.
    mask:           [B, T] bool or 0/1: the completion's real tokens. Padded positions get no loss and no
                    gradient, whatever the other tensors hold there.
    loss_type:      "grpo" | "bnpo" | "dr_grpo" | "dapo"; see the module docstring for the formulas and for
                    `num_items_in_batch` / `num_sequences_in_batch` (the global counts).
    epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]; epsilon_high defaults
                    to epsilon (DAPO's clip-higher sets it larger, e.g. 0.2 / 0.28).
    importance_sampling_level:
        "token":    r_it = exp(logprobs_it - old_logprobs_it)  (PPO, GRPO).
        "sequence": GSPO. s_i = exp(mean over i's valid tokens of (logprobs - old_logprobs)); every token
                    of sequence i gets r_it = exp(sg[log s_i] + logprobs_it - sg[logprobs_it]), whose value
                    is s_i and whose gradient is s_i times that of logprobs_it (GSPO-token; with one
                    advantage per sequence it has the same gradient as GSPO). GSPO uses a much smaller
                    epsilon (3e-4 / 4e-4 in the paper) and loss_type="grpo".
    The per-token loss is l_it = -min(r_it A_i, clip(r_it, 1 - epsilon, 1 + epsilon_high) A_i)
                                 * rollout_is_weights_it          (when given)
                                 + beta * KL_it                   (when beta > 0)
                                 - entropy_coef * entropy_it      (when entropy_coef != 0)
    The importance weights multiply the policy term only, not the KL or entropy terms, as TRL and verl
    apply their rollout correction.
    ref_logprobs:   [B, T] under the reference policy (constants); required when beta > 0. When given,
                    the KL is logged even with beta = 0.
    kl_estimator:   "k1" | "k2" | "k3", see `kl_penalty`.
    max_completion_length: the generation limit; required by dr_grpo, whose normalizer is
                    S * max_completion_length (a constant, independent of the actual lengths).
    entropy:        [B, T] the policy's entropy at each position (differentiable; `token_logprobs_and_entropy`).
    rollout_is_weights: [B, T] `truncated_is_weights`, constants.

    Returns (loss, metrics): loss a float32 scalar; metrics detached float32 scalars, means over this
    call's valid tokens, with TRL's names:
        "clip_ratio/low_mean"     fraction of tokens with r < 1 - epsilon and A < 0 (clipped below)
        "clip_ratio/high_mean"    fraction with r > 1 + epsilon_high and A > 0 (clipped above)
        "clip_ratio/region_mean"  either of the two
        "kl"                      mean per-token KL (when ref_logprobs is given)
        "entropy"                 mean entropy (when entropy is given)
    r is the ratio used for clipping (s_i for every token at sequence level). For a whole-batch figure,
    weight the micro-batches' metrics by their `mask.sum()`.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    for name, tensor in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs {tuple(shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must be [B] = [{shape[0]}], got shape {tuple(advantages.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    if kl_estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {kl_estimator!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    # Padded positions are zeroed before any nonlinearity, so garbage there (-inf, NaN) reaches neither
    # the loss nor, through torch.where's backward, the gradient.
    valid = mask.bool()
    zeros = torch.zeros(shape, dtype=torch.float32, device=logprobs.device)

    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.float(), zeros)

    logp = clean(logprobs)
    old = clean(old_logprobs.detach())
    adv = advantages.detach().float()[:, None]
    tokens_per_seq = valid.sum(dim=-1).float()

    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        log_seq = log_ratio.sum(dim=-1, keepdim=True) / tokens_per_seq.clamp(min=1)[:, None]
        log_weight = log_seq.detach() + logp - logp.detach()
    ratio = torch.exp(log_weight)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if rollout_is_weights is not None:
        per_token = per_token * clean(rollout_is_weights.detach())

    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logp, clean(ref_logprobs.detach()), kl_estimator)
        if beta > 0:
            per_token = per_token + beta * kl
    ent = None
    if entropy is not None:
        ent = clean(entropy)
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * ent
    per_token = torch.where(valid, per_token, zeros)

    num_sequences = shape[0] if num_sequences_in_batch is None else num_sequences_in_batch
    if loss_type == "grpo":
        loss = (per_token.sum(dim=-1) / tokens_per_seq.clamp(min=1)).sum() / num_sequences
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (num_sequences * max_completion_length)
    else:  # bnpo, dapo
        num_items = tokens_per_seq.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / num_items

    with torch.no_grad():
        num_valid = tokens_per_seq.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x.float(), zeros).sum() / num_valid

        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": token_mean(low),
            "clip_ratio/high_mean": token_mean(high),
            "clip_ratio/region_mean": token_mean(low | high),
        }
        if kl is not None:
            metrics["kl"] = token_mean(kl)
        if ent is not None:
            metrics["entropy"] = token_mean(ent)
    return loss, metrics
