"""model.kernels.lm_head_logprobs: the Triton kernel's log-probs, entropies and gradients against the chunked
PyTorch reference, and the reference against grpo's token log-probs (the trainer's definition)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels_helpers import device  # noqa: F401  (the fixture)

from model import kernels  # isort: skip


def _inputs(N, V, D, dtype, on, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).to(on).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).to(on).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(on)
    temperature = (torch.rand(N, generator=g) + 0.5).to(on)
    return hidden, weight, targets, temperature


def _run(impl, hidden, weight, targets, temperature, with_entropy):
    logprobs, entropy = kernels.lm_head_logprobs(hidden, weight, targets, temperature, with_entropy, impl=impl)
    loss = (logprobs * torch.linspace(-1, 1, len(targets), device=logprobs.device)).sum()
    if with_entropy:
        loss = loss + entropy.cos().sum()
    return (logprobs, *(() if entropy is None else (entropy,)), *torch.autograd.grad(loss, [hidden, weight]))


@pytest.mark.parametrize("shape", [(1, 17, 16), (5, 70, 20), (67, 130, 33), (64, 64, 64)],
                         ids=lambda s: f"N{s[0]}V{s[1]}D{s[2]}")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_lm_head_logprobs_and_gradients_match_reference(shape, with_entropy, device):  # noqa: F811
    args = _inputs(*shape, torch.float32, device)
    got, want = _run("triton", *args, with_entropy), _run("reference", *args, with_entropy)
    for g, w, name in zip(got, want, ["logprobs", "entropy", "d_hidden", "d_weight"][-len(got):] if with_entropy
                          else ["logprobs", "d_hidden", "d_weight"]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lm_head_half_precision_matches_reference(dtype, device):  # noqa: F811
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16)")
    args = _inputs(9, 100, 16, dtype, device)
    for g, w in zip(_run("triton", *args, True), _run("reference", *args, True)):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


def test_lm_head_forward_only_and_scalar_temperature(device):  # noqa: F811
    hidden, weight, targets, _ = _inputs(7, 40, 16, torch.float32, device)
    with torch.no_grad():
        got = kernels.lm_head_logprobs(hidden.view(1, 7, 16), weight, targets.view(1, 7), 0.7, True, impl="triton")
        want = kernels.lm_head_logprobs(hidden.view(1, 7, 16), weight, targets.view(1, 7), 0.7, True, impl="reference")
    assert got[0].shape == (1, 7)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_reference_lm_head_matches_grpo_token_logprobs():
    from grpo.logprobs import token_logprobs_and_entropy

    hidden, weight, targets, _ = _inputs(11, 50, 12, torch.float32, "cpu")
    got = kernels.lm_head_logprobs(hidden, weight, targets, 0.8, True, impl="reference")
    want = token_logprobs_and_entropy(hidden, weight, targets, 0.8, chunk_size=4)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got[0].sum() + got[1].sum(), [hidden, weight])
    g_want = torch.autograd.grad(want[0].sum() + want[1].sum(), [hidden, weight])
    torch.testing.assert_close(g_got, g_want)


def test_grpo_logprobs_run_the_triton_kernel_where_it_is_chosen(device, monkeypatch):  # noqa: F811
    """The trainer's log-probs (grpo.logprobs) go through the dispatch point: the Triton kernel where it is
    chosen (CUDA; here forced), with the chunked PyTorch values and gradients."""
    from grpo.logprobs import token_logprobs_and_entropy

    hidden, weight, targets, _ = _inputs(10, 70, 16, torch.float32, device)
    hidden, targets = hidden.view(2, 5, 16), targets.view(2, 5)
    monkeypatch.setenv("R1_GRPO_KERNELS", "reference")
    want = token_logprobs_and_entropy(hidden, weight, targets, 0.9, chunk_size=3)
    calls = []
    entry = kernels.lm_head_logprobs
    monkeypatch.setattr(kernels, "lm_head_logprobs", lambda *a, **k: calls.append(1) or entry(*a, **k))
    monkeypatch.setenv("R1_GRPO_KERNELS", "triton")
    got = token_logprobs_and_entropy(hidden, weight, targets, 0.9, chunk_size=3)
    assert calls and got[0].shape == (2, 5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    g_got = torch.autograd.grad(got[0].sum() + got[1].sum(), [hidden, weight])
    g_want = torch.autograd.grad(want[0].sum() + want[1].sum(), [hidden, weight])
    torch.testing.assert_close(g_got, g_want, atol=2e-5, rtol=2e-5)
