"""The GRPO policy loss against values and gradients worked out by hand on 2 sequences of 3 tokens, its
clip metrics, KL estimators and importance weights, and the micro-batch / rank normalization contract."""

import math

import pytest
import torch

from grpo.advantages import group_advantages
from grpo.losses import POLICY_LOSSES, kl_penalty, policy_loss, register_policy_loss, truncated_is_weights

E = math.exp

# Two sequences of 3 tokens; the second has 2 real tokens and a padded one.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]])
LOG_RATIO = torch.tensor([[0.25, -0.3, 0.0], [0.1, -0.3, 7.0]])  # 7.0 sits on the padding
ADV = torch.tensor([1.0, -0.5])

# Token level, epsilon = 0.2: ratios are clipped to [0.8, 1.2]; per-token loss = -min(r A, clip(r) A).
#  seq 0, A = 1:    r = e^0.25 = 1.284 > 1.2 -> clipped: -1.2      (no gradient)
#                   r = e^-0.3 = 0.741 < 0.8 but A > 0 -> -min(0.741, 0.8) = -0.741 (not clipped)
#                   r = 1                  -> -1
#  seq 1, A = -0.5: r = e^0.1 = 1.105       -> -min(-0.553, -0.553) = +0.5 e^0.1
#                   r = e^-0.3 = 0.741 < 0.8 and A < 0 -> clipped: -min(-0.370, -0.4) = +0.4 (no gradient)
TOKEN_LOSS = [[-1.2, -E(-0.3), -1.0], [0.5 * E(0.1), 0.4]]
SEQ0, SEQ1 = sum(TOKEN_LOSS[0]), sum(TOKEN_LOSS[1])


def _logprobs(log_ratio=LOG_RATIO, old=OLD):
    return (old + log_ratio).requires_grad_()


def _loss(logprobs, **kwargs):
    kwargs.setdefault("loss_type", "dapo")
    kwargs.setdefault("epsilon", 0.2)
    return policy_loss(logprobs, OLD, ADV, MASK, **kwargs)


@pytest.mark.parametrize(
    ("loss_type", "extra", "expected"),
    [
        ("grpo", {}, (SEQ0 / 3 + SEQ1 / 2) / 2),  # mean over each sequence's tokens, then over sequences
        ("bnpo", {}, (SEQ0 + SEQ1) / 5),  # 5 valid tokens in the batch
        ("dapo", {}, (SEQ0 + SEQ1) / 5),
        ("dapo", {"num_items_in_batch": 10}, (SEQ0 + SEQ1) / 10),  # the global token count
        ("dr_grpo", {"max_completion_length": 4}, (SEQ0 + SEQ1) / (2 * 4)),
        ("grpo", {"num_sequences_in_batch": 8}, (SEQ0 / 3 + SEQ1 / 2) / 8),
    ],
)
def test_token_level_loss_types_by_hand(loss_type, extra, expected):
    loss, _ = _loss(_logprobs(), loss_type=loss_type, **extra)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_token_level_gradient_by_hand():
    logprobs = _logprobs()
    loss, _ = _loss(logprobs, loss_type="dapo")
    loss.backward()
    # d/d logprob of -r A / 5 is -r A / 5 where not clipped; clipped tokens and padding get 0.
    expected = [[0.0, -E(-0.3) / 5, -1.0 / 5], [0.5 * E(0.1) / 5, 0.0, 0.0]]
    assert logprobs.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in expected]


def test_clip_metrics_by_hand():
    _, metrics = _loss(_logprobs())
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)  # seq 0 token 0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)  # seq 1 token 1
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert "kl" not in metrics and "entropy" not in metrics


def test_epsilon_high_widens_the_upper_clip_only():
    # epsilon_high = 0.3: e^0.25 = 1.284 < 1.3 is no longer clipped; the low side is unchanged.
    logprobs = _logprobs()
    loss, metrics = _loss(logprobs, epsilon_high=0.3)
    expected = (-E(0.25) - E(-0.3) - 1.0 + 0.5 * E(0.1) + 0.4) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clip_ratio/high_mean"].item() == 0.0
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)


# Sequence level (GSPO), epsilon = 0.05: clip to [0.95, 1.05].
#  seq 0: s = exp((0.25 - 0.3 + 0) / 3) = e^(-1/60) = 0.983, A = 1 -> not clipped, each token -s
#  seq 1: s = exp((0.1 - 0.3) / 2) = e^-0.1 = 0.905 < 0.95, A = -0.5 -> clipped: each token -(0.95 * -0.5)
S0, S1 = E(-1 / 60), E(-0.1)


@pytest.mark.parametrize(
    ("loss_type", "extra", "expected"),
    [
        ("grpo", {}, (-S0 + 0.475) / 2),
        ("bnpo", {}, (3 * -S0 + 2 * 0.475) / 5),
        ("dapo", {"num_items_in_batch": 10}, (3 * -S0 + 2 * 0.475) / 10),
        ("dr_grpo", {"max_completion_length": 3}, (3 * -S0 + 2 * 0.475) / (2 * 3)),
    ],
)
def test_sequence_level_loss_types_by_hand(loss_type, extra, expected):
    loss, _ = _loss(
        _logprobs(), loss_type=loss_type, epsilon=0.05, importance_sampling_level="sequence", **extra
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_level_gradient_and_metrics_by_hand():
    logprobs = _logprobs()
    loss, metrics = _loss(logprobs, loss_type="grpo", epsilon=0.05, importance_sampling_level="sequence")
    loss.backward()
    # grpo: (1/2) * (1/3) * sum_t -s0_t A: each of seq 0's tokens gets -s0 / 6 (the ratio's value is s0,
    # its gradient that of the token's own log-prob); seq 1 is clipped.
    expected = [[-S0 / 6] * 3, [0.0, 0.0, 0.0]]
    assert logprobs.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in expected]
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(2 / 5)  # seq 1's two tokens
    assert metrics["clip_ratio/high_mean"].item() == 0.0


def test_sequence_level_gradient_equals_gspo_without_the_per_token_trick():
    # GSPO's own form: one ratio per sequence, d s / d logprob_t = s / |y|; with one advantage per
    # sequence the per-token (stop-gradient) form gives the same gradient.
    logprobs = _logprobs(LOG_RATIO * 0.1)
    loss, _ = _loss(logprobs, loss_type="dapo", epsilon=0.2, importance_sampling_level="sequence")
    loss.backward()
    other = _logprobs(LOG_RATIO * 0.1)
    m = MASK.float()
    lengths = m.sum(-1)
    s = torch.exp(((other - OLD) * m).sum(-1) / lengths)  # no clipping at these ratios
    (-(s * ADV * lengths).sum() / 5).backward()
    assert torch.allclose(logprobs.grad, other.grad * m, atol=1e-7)


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # d = ref - logprobs = (-0.5, 1)
    assert kl_penalty(logprobs, ref, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logprobs, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5])
    assert kl_penalty(logprobs, ref, "k3")[0].tolist() == pytest.approx([E(-0.5) + 0.5 - 1, E(1.0) - 1 - 1])
    with pytest.raises(ValueError):
        kl_penalty(logprobs, ref, "k4")


def test_kl_penalty_in_the_loss_by_hand():
    # Zero advantages: only beta * k3 is left. bnpo over the 2 tokens.
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, metrics = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(1),
        torch.ones(1, 2),
        loss_type="bnpo",
        epsilon=0.2,
        ref_logprobs=ref,
        beta=0.1,
    )
    k3 = [E(-0.5) + 0.5 - 1, E(1.0) - 2]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2)
    assert metrics["kl"].item() == pytest.approx(sum(k3) / 2)
    loss.backward()
    # d k3 / d logprob = 1 - exp(ref - logprob)
    assert logprobs.grad[0].tolist() == pytest.approx([0.1 * (1 - E(-0.5)) / 2, 0.1 * (1 - E(1.0)) / 2])


def test_entropy_bonus_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    entropy = torch.tensor([[2.0, 3.0]], requires_grad=True)
    loss, metrics = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(1),
        torch.ones(1, 2),
        loss_type="grpo",
        epsilon=0.2,
        entropy=entropy,
        entropy_coef=0.01,
    )
    assert loss.item() == pytest.approx(-0.01 * 2.5)
    assert metrics["entropy"].item() == pytest.approx(2.5)
    loss.backward()
    assert entropy.grad[0].tolist() == pytest.approx([-0.005, -0.005])


def test_rollout_is_weights_multiply_the_policy_term_only():
    weights = torch.tensor([[0.5, 2.0, 1.0], [1.5, 1.0, 1.0]])
    ref = OLD + LOG_RATIO + 0.5  # ref - logprob = 0.5 at every token: k3 = e^0.5 - 1.5
    logprobs = _logprobs()
    loss, _ = _loss(logprobs, rollout_is_weights=weights, ref_logprobs=ref, beta=0.1)
    k3 = E(0.5) - 1.5
    policy = 0.5 * -1.2 + 2.0 * -E(-0.3) + 1.0 * -1.0 + 1.5 * 0.5 * E(0.1) + 1.0 * 0.4
    assert loss.item() == pytest.approx((policy + 5 * 0.1 * k3) / 5, rel=1e-6)


def test_truncated_is_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, -3.0]])
    w = truncated_is_weights(old, rollout, cap=1.5)
    assert w[0].tolist() == pytest.approx([1.5, E(-1.0), 1.0])  # e^0.5 = 1.65 is capped at 1.5
    assert not w.requires_grad


def test_zero_advantage_groups_give_exactly_zero_gradient():
    rewards = torch.tensor([[0.7837985890347726] * 3, [1.0] * 3])  # every group's rewards equal
    advantages = group_advantages(rewards, scale_rewards="group").advantages.reshape(-1)
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]] * 3)
    old = -torch.rand(6, 4) * 3
    for loss_type in POLICY_LOSSES:
        for level in ("token", "sequence"):
            logprobs = (old + torch.randn(6, 4) * 0.3).requires_grad_()
            loss, _ = policy_loss(
                logprobs,
                old,
                advantages,
                mask,
                loss_type=loss_type,
                epsilon=0.2,
                epsilon_high=0.28,
                importance_sampling_level=level,
                max_completion_length=4,
            )
            loss.backward()
            assert torch.equal(logprobs.grad, torch.zeros(6, 4)), (loss_type, level)
            assert loss.item() == 0.0


def test_padding_garbage_reaches_neither_loss_nor_gradient():
    old = OLD.clone()
    old[1, 2] = float("-inf")
    ref = OLD.clone()
    ref[1, 2] = float("nan")
    logprobs = _logprobs()
    loss, metrics = policy_loss(
        logprobs,
        old,
        ADV,
        MASK,
        loss_type="grpo",
        epsilon=0.2,
        ref_logprobs=ref,
        beta=0.04,
        rollout_is_weights=torch.full((2, 3), float("inf")).masked_fill(MASK.bool(), 1.0),
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all() and logprobs.grad[1, 2] == 0
    assert all(torch.isfinite(v) for v in metrics.values())


def test_bad_arguments_are_refused():
    logprobs = _logprobs()
    with pytest.raises(ValueError):
        _loss(logprobs, loss_type="dr_grpo")  # no max_completion_length
    with pytest.raises(ValueError):
        _loss(logprobs, beta=0.1)  # no ref_logprobs
    with pytest.raises(ValueError):
        _loss(logprobs, loss_type="sum")
    with pytest.raises(ValueError):
        _loss(logprobs, importance_sampling_level="group")
    with pytest.raises(ValueError):
        _loss(logprobs, entropy_coef=0.1)
    with pytest.raises(ValueError):
        policy_loss(logprobs, OLD, ADV[:1], MASK, loss_type="grpo", epsilon=0.2)


def _random_batch(seed=0, batch=6, length=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5])[:batch]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old = -torch.rand(batch, length, generator=g) * 3
    logprobs = old + torch.randn(batch, length, generator=g) * 0.3
    ref = old + torch.randn(batch, length, generator=g) * 0.2
    entropy = torch.rand(batch, length, generator=g) * 2
    weights = truncated_is_weights(old, old + torch.randn(batch, length, generator=g) * 0.1, cap=2.0)
    advantages = torch.randn(batch, generator=g)
    return logprobs, old, advantages, mask, ref, entropy, weights


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(POLICY_LOSSES))
def test_micro_batches_with_global_counts_sum_to_the_full_batch(loss_type, level):
    logprobs, old, advantages, mask, ref, entropy, weights = _random_batch()
    options = {
        "loss_type": loss_type,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "importance_sampling_level": level,
        "beta": 0.04,
        "max_completion_length": 5,
        "entropy_coef": 0.01,
    }

    def run(rows, **counts):
        lp = logprobs[rows].clone().requires_grad_()
        ent = entropy[rows].clone().requires_grad_()
        loss, _ = policy_loss(
            lp,
            old[rows],
            advantages[rows],
            mask[rows],
            ref_logprobs=ref[rows],
            entropy=ent,
            rollout_is_weights=weights[rows],
            **options,
            **counts,
        )
        loss.backward()
        return loss, lp.grad, ent.grad

    full_loss, full_grad, full_ent_grad = run(slice(0, 6))  # no counts: the call is the whole batch
    counts = {"num_items_in_batch": int(mask.sum()), "num_sequences_in_batch": 6}
    # Uneven micro-batches (2 and 4 sequences, 6 and 14 tokens), losses summed, no other scaling.
    parts = [run(slice(0, 2), **counts), run(slice(2, 6), **counts)]
    assert torch.allclose(sum(p[0] for p in parts), full_loss, atol=1e-6)
    assert torch.allclose(torch.cat([p[1] for p in parts]), full_grad, atol=1e-7)
    assert torch.allclose(torch.cat([p[2] for p in parts]), full_ent_grad, atol=1e-7)

    # Two ranks of two micro-batches each, gradients averaged across ranks as DDP does: passing the counts
    # divided by the world size (equivalently, multiplying each loss by it) gives the full batch again.
    world = 2
    per_rank = {"num_items_in_batch": int(mask.sum()) / world, "num_sequences_in_batch": 6 / world}
    ranks = [
        [run(slice(0, 1), **per_rank), run(slice(1, 3), **per_rank)],
        [run(slice(3, 5), **per_rank), run(slice(5, 6), **per_rank)],
    ]
    rank_grads = [torch.zeros(6, 5), torch.zeros(6, 5)]  # each rank's gradient of the full parameter
    for r, (rows, calls) in enumerate(zip([(0, 1, 3), (3, 5, 6)], ranks)):
        rank_grads[r][rows[0] : rows[1]] = calls[0][1]
        rank_grads[r][rows[1] : rows[2]] = calls[1][1]
    assert torch.allclose((rank_grads[0] + rank_grads[1]) / world, full_grad, atol=1e-7)


def test_cispo_clips_the_detached_weight_and_keeps_every_tokens_gradient():
    # logp = OLD + LOG_RATIO = [[-0.75, -2.3, -0.5], [-1.4, -1.0, pad]]; epsilon 0.2: weights clipped to [0.8, 1.2].
    #  seq 0, A = 1:    w = clip(e^0.25) = 1.2, clip(e^-0.3) = 0.8, 1   -> -w A logp = 0.9, 1.84, 0.5
    #  seq 1, A = -0.5: w = e^0.1 (inside), clip(e^-0.3) = 0.8          -> -w A logp = -0.7 e^0.1, -0.4
    # A token-level mean over the 5 real tokens, like dapo.
    logprobs = _logprobs()
    loss, _ = _loss(logprobs, loss_type="cispo")
    assert loss.item() == pytest.approx((0.9 + 1.84 + 0.5 - 0.7 * E(0.1) - 0.4) / 5, rel=1e-6)
    loss.backward()
    # d/dlogp = -w A / 5: the clipped tokens keep a gradient (PPO's clip gives them none), the padding none.
    expected = torch.tensor([[-1.2, -0.8, -1.0], [0.5 * E(0.1), 0.4, 0.0]]) / 5
    assert torch.allclose(logprobs.grad, expected, atol=1e-7)


def test_a_registered_loss_is_a_recipe_loss_type_and_a_bad_name_lists_the_registry():
    from grpo.config import RecipeError, load_recipe

    assert load_recipe(overrides=["model.preset=micro", "algorithm.loss_type=cispo"]).algorithm.loss_type == "cispo"
    with pytest.raises(RecipeError, match=r"algorithm.loss_type: 'ppo' is not allowed; allowed: .*'dapo'.*'cispo'"):
        load_recipe(overrides=["model.preset=micro", "algorithm.loss_type=ppo"])
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("dapo", aggregate="token_mean")(lambda t: t.ratio)
    with pytest.raises(ValueError, match="aggregate"):
        register_policy_loss("new", aggregate="median")
