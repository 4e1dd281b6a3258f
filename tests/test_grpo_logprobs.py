"""Chunked per-token log-probabilities and entropies equal the plain full-vocabulary computation, in value
and gradient, and the backward keeps no [tokens, vocabulary] tensor."""

import pytest
import torch

from grpo.logprobs import token_logprobs, token_logprobs_and_entropy

B, T, D, V = 2, 5, 8, 13


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, targets


def _plain(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T).to(torch.promote_types(weight.dtype, torch.float32)) / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, targets[..., None])[..., 0], -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 10, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_computation(chunk_size, temperature):
    hidden, weight, targets = _inputs()
    logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets, temperature, chunk_size)
    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    grads = torch.autograd.grad((logprobs * up_lp).sum() + (entropy * up_ent).sum(), (hidden, weight))

    ref_lp, ref_ent = _plain(hidden, weight, targets, temperature)
    ref_grads = torch.autograd.grad((ref_lp * up_lp).sum() + (ref_ent * up_ent).sum(), (hidden, weight))
    assert logprobs.shape == entropy.shape == (B, T) and logprobs.dtype == torch.float32
    assert torch.allclose(logprobs, ref_lp, atol=1e-5)
    assert torch.allclose(entropy, ref_ent, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-5)


def test_logprobs_alone_and_their_gradient():
    hidden, weight, targets = _inputs(2)
    logprobs = token_logprobs(hidden, weight, targets, temperature=0.6, chunk_size=3)
    logprobs.sum().backward()
    ref_lp, _ = _plain(hidden.detach().requires_grad_(), weight, targets, 0.6)
    assert torch.allclose(logprobs, ref_lp, atol=1e-5)
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    _plain(ref_hidden, ref_weight, targets, 0.6)[0].sum().backward()
    assert torch.allclose(hidden.grad, ref_hidden.grad, atol=1e-5)
    assert torch.allclose(weight.grad, ref_weight.grad, atol=1e-5)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 3, 4, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.tensor([[0, 5, 2]])

    def both(h, w):
        return token_logprobs_and_entropy(h, w, targets, 0.8, 2)

    assert torch.autograd.gradcheck(both, (hidden, weight))


def _saved_shapes(fn):
    """Shapes of every tensor autograd saves for the backward while fn runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_backward_keeps_no_vocabulary_sized_activation():
    hidden, weight, targets = _inputs()

    def has_logits(shapes):
        return any(len(s) >= 2 and s[-1] == V and s != (V, D) for s in shapes)

    assert has_logits(_saved_shapes(lambda: _plain(hidden, weight, targets)))  # the check can see them
    assert not has_logits(_saved_shapes(lambda: token_logprobs_and_entropy(hidden, weight, targets, 1.0, 2)))


def test_frozen_head_or_frozen_hidden_and_no_grad():
    hidden, weight, targets = _inputs(4)
    frozen = weight.detach()
    token_logprobs(hidden, frozen, targets, chunk_size=4).sum().backward()
    assert hidden.grad is not None and frozen.grad is None
    with torch.no_grad():
        values = token_logprobs(hidden, weight, targets, chunk_size=4)
    assert not values.requires_grad
    assert torch.allclose(values, _plain(hidden, weight, targets)[0], atol=1e-5)


def test_bfloat16_inputs_give_float32_logprobs_close_to_float32():
    hidden, weight, targets = _inputs(5)
    low = token_logprobs(hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16(), targets)
    assert low.dtype == torch.float32
    assert torch.allclose(low, _plain(hidden, weight, targets)[0], atol=0.15)


def test_bad_arguments_are_refused():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets[:, :3])
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError):
        token_logprobs(hidden, weight, targets, chunk_size=0)
