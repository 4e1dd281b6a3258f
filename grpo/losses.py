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

Adding a loss
-------------
A loss is one function registered under its `algorithm.loss_type` name with `@register_policy_loss(name,
aggregate=...)`: it maps the importance ratios, log-probabilities and advantages to the per-token policy
term, and `aggregate` names one of the normalizations above. The recipe's allowed names are this registry's
keys (`POLICY_LOSSES`), so nothing else needs editing. CISPO below is the example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

ImportanceSamplingLevel = Literal["token", "sequence"]
KLEstimator = Literal["k1", "k2", "k3"]


# ----- the registry of policy losses ------------------------------------------------------------------------
@dataclass
class PolicyTerms:
    """What a policy loss sees of a micro-batch; padded positions hold zeros (the loss masks them after).

    ratio:    [B, T] the importance ratio r_it (differentiable; s_i at sequence level, see `policy_loss`)
    logp:     [B, T] log pi_theta of the sampled tokens (differentiable)
    adv:      [B, 1] the advantages (constants)
    epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high]
    """

    ratio: torch.Tensor
    logp: torch.Tensor
    adv: torch.Tensor
    epsilon: float
    epsilon_high: float


@dataclass
class Normalizers:
    """The whole batch's counts a per-token loss is divided by (module docstring)."""

    tokens_per_seq: torch.Tensor  # [B] this call's valid tokens per sequence
    num_sequences: int | float | torch.Tensor  # S
    num_items: int | float | torch.Tensor | None  # N; None: this call's own count
    max_completion_length: int | None


def _seq_mean_token_mean(per_token: torch.Tensor, n: Normalizers) -> torch.Tensor:
    return (per_token.sum(dim=-1) / n.tokens_per_seq.clamp(min=1)).sum() / n.num_sequences


def _token_mean(per_token: torch.Tensor, n: Normalizers) -> torch.Tensor:
    num_items = n.tokens_per_seq.sum().clamp(min=1) if n.num_items is None else n.num_items
    return per_token.sum() / num_items


def _token_sum_over_max_length(per_token: torch.Tensor, n: Normalizers) -> torch.Tensor:
    if n.max_completion_length is None:
        raise ValueError("this loss_type (dr_grpo's normalization) needs max_completion_length")
    return per_token.sum() / (n.num_sequences * n.max_completion_length)


#: The normalizations of the module docstring, by the name a loss registers with.
AGGREGATIONS: dict[str, Callable[[torch.Tensor, Normalizers], torch.Tensor]] = {
    "seq_mean_token_mean": _seq_mean_token_mean,  # grpo: each sequence's token mean, averaged over S
    "token_mean": _token_mean,  # bnpo, dapo: a sum over tokens / N
    "token_sum_over_max_length": _token_sum_over_max_length,  # dr_grpo: a sum over tokens / (S * max length)
}


@dataclass(frozen=True)
class PolicyLoss:
    """A registered loss: its per-token policy term and how the terms are normalized."""

    name: str
    per_token: Callable[[PolicyTerms], torch.Tensor]
    aggregate: str


#: algorithm.loss_type -> its loss; the recipe's allowed values are these keys.
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, *, aggregate: str) -> Callable:
    """Decorator: register `fn(PolicyTerms) -> [B, T] per-token loss` as `algorithm.loss_type: name`."""
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"policy loss {name!r}: aggregate {aggregate!r} is not one of {sorted(AGGREGATIONS)}")

    def register(fn: Callable[[PolicyTerms], torch.Tensor]) -> Callable[[PolicyTerms], torch.Tensor]:
        if name in POLICY_LOSSES:
            raise ValueError(f"a policy loss named {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(name, fn, aggregate)
        return fn

    return register


def _clipped_surrogate(t: PolicyTerms) -> torch.Tensor:
    """PPO's -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)."""
    clipped = t.ratio.clamp(1 - t.epsilon, 1 + t.epsilon_high)
    return -torch.min(t.ratio * t.adv, clipped * t.adv)


@register_policy_loss("grpo", aggregate="seq_mean_token_mean")
def grpo_loss(t: PolicyTerms) -> torch.Tensor:
    """GRPO (DeepSeekMath): the clipped surrogate, a token mean per sequence, then a mean over sequences."""
    return _clipped_surrogate(t)


@register_policy_loss("bnpo", aggregate="token_mean")
def bnpo_loss(t: PolicyTerms) -> torch.Tensor:
    """BNPO: the clipped surrogate over the batch's tokens (with the global N, the same estimator as dapo)."""
    return _clipped_surrogate(t)


@register_policy_loss("dapo", aggregate="token_mean")
def dapo_loss(t: PolicyTerms) -> torch.Tensor:
    """DAPO: the clipped surrogate, a token-level mean over the whole batch."""
    return _clipped_surrogate(t)


@register_policy_loss("dr_grpo", aggregate="token_sum_over_max_length")
def dr_grpo_loss(t: PolicyTerms) -> torch.Tensor:
    """Dr. GRPO: the clipped surrogate over a constant normalizer, S * max_completion_length."""
    return _clipped_surrogate(t)


@register_policy_loss("cispo", aggregate="token_mean")
def cispo_loss(t: PolicyTerms) -> torch.Tensor:
    """CISPO (MiniMax-M1): clip the importance weight, not the update. The per-token term is
    -sg(clip(r, 1 - epsilon, 1 + epsilon_high)) * A * log pi_theta: every token keeps a gradient (A times the
    clipped weight), where PPO's clip zeroes the gradient of tokens whose ratio left the range. The paper sets
    no lower bound in practice (a large epsilon, e.g. 1.0) and tunes epsilon_high."""
    weight = t.ratio.clamp(1 - t.epsilon, 1 + t.epsilon_high).detach()
    return -weight * t.adv * t.logp


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
    loss_type: str,
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
    loss_type:      a key of `POLICY_LOSSES`: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "cispo"; see the module
                    docstring for the formulas and for `num_items_in_batch` / `num_sequences_in_batch` (the
                    global counts).
    epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]; epsilon_high defaults
                    to epsilon (DAPO's clip-higher sets it larger, e.g. 0.2 / 0.28).
    importance_sampling_level:
        "token":    r_it = exp(logprobs_it - old_logprobs_it)  (PPO, GRPO).
        "sequence": GSPO. s_i = exp(mean over i's valid tokens of (logprobs - old_logprobs)); every token
                    of sequence i gets r_it = exp(sg[log s_i] + logprobs_it - sg[logprobs_it]), whose value
                    is s_i and whose gradient is s_i times that of logprobs_it (GSPO-token; with one
                    advantage per sequence it has the same gradient as GSPO). GSPO uses a much smaller
                    epsilon (3e-4 / 4e-4 in the paper) and loss_type="grpo".
    The per-token loss is l_it = -min(r_it A_i, clip(r_it, 1 - epsilon, 1 + epsilon_high) A_i)  (cispo: its own)
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

    This function is over 60 lines because this docstring is the loss's whole contract (shapes, formulas,
    metrics); the code is one pass of tensor operations, the per-token term coming from `POLICY_LOSSES`.

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
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(POLICY_LOSSES)}, got {loss_type!r}")
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
    loss_fn = POLICY_LOSSES[loss_type]
    if loss_fn.aggregate == "token_sum_over_max_length" and max_completion_length is None:
        raise ValueError(f"loss_type={loss_type!r} needs max_completion_length")
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
    per_token = loss_fn.per_token(PolicyTerms(ratio, logp, adv, epsilon, epsilon_high))
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
    loss = AGGREGATIONS[loss_fn.aggregate](
        per_token, Normalizers(tokens_per_seq, num_sequences, num_items_in_batch, max_completion_length))

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
