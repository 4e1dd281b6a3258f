"""The MoE layer's training path: the routed experts' gradients (x, routing weights, both projections) equal
torch.autograd through `model.kernels.reference`, on the CPU (the model's own paths, unchanged) and on CUDA
(through `model.kernels.routed_experts`: Triton's grouped GEMMs and their backward, or torch._grouped_mm in
bf16 on Hopper) with no host read of the expert counts; routing replay and the feed-forward on the real tokens
only (token_index) still give the padded batch's gradients. The CUDA cases skip, with the reason, without a GPU."""

from __future__ import annotations

import devices
import pytest
import torch

from model import build_model, kernels
from model.kernels import moe as triton_moe
from model.kernels import reference
from model.moe import Experts
from model.presets import preset_config

device = devices.device  # the fixture: "cpu", and "cuda" where there is one


def _experts(E=6, D=32, I=24, seed=0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    experts = Experts(E, D, I)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, D, generator=g) / D**0.5)
        experts.down_proj.copy_(torch.randn(E, D, I, generator=g) / I**0.5)
    return experts


def _batch(N=23, K=2, E=6, D=32, used=5, seed=1):
    """x [N, D], weights [N, K], expert ids [N, K] (experts past `used` get no token), d output [N, D]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(used, generator=g)[:K] for _ in range(N)])
    return torch.randn(N, D, generator=g), torch.rand(N, K, generator=g), ids, torch.randn(N, D, generator=g)


def _grads(experts: Experts, x, weights, ids, grad_out):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    experts.zero_grad()
    out = experts(x, weights, ids)
    out.backward(grad_out)
    # clones: Module.to() moves the parameters' gradients in place
    return tuple(t.detach().clone() for t in (out, x.grad, weights.grad, experts.gate_up_proj.grad,
                                               experts.down_proj.grad))


def test_the_references_gradients_are_the_model_experts_gradients():
    """The reference is the semantics the CUDA path is held to: on the CPU, its autograd gradients are those
    of `Experts`' own training path."""
    experts = _experts()
    x, weights, ids, grad_out = _batch()
    want = _grads(experts, x, weights, ids, grad_out)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    gate_up, down = (p.detach().clone().requires_grad_() for p in (experts.gate_up_proj, experts.down_proj))
    out = reference.routed_experts(x, weights, ids, gate_up, down)
    got = (out.detach(), *torch.autograd.grad(out, (x, weights, gate_up, down), grad_out))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_experts_training_gradients_match_the_reference(device):
    """`Experts` in training on `device` (the CPU's grouped_mm path; CUDA's kernels dispatch) against the
    reference's autograd on the CPU, float32."""
    experts = _experts()
    x, weights, ids, grad_out = _batch()
    want = _grads(experts, x, weights, ids, grad_out)
    got = _grads(experts.to(device), x.to(device), weights.to(device), ids.to(device), grad_out.to(device))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_experts_training_on_cuda_goes_through_the_kernels_without_a_host_sync(dtype, monkeypatch):
    """On CUDA the training forward and backward of `Experts` run `model.kernels.moe.RoutedExperts` (with its
    matmuls in torch._grouped_mm where `grouped_mm_fits`, else Triton), and neither synchronizes with the host:
    torch.cuda's sync debug mode raises on any read-back (.tolist(), .item(), nonzero)."""
    reason = devices.skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    calls = []
    original = triton_moe.routed_experts

    def spy(*args, **kw):
        calls.append(kw.get("gemm"))
        return original(*args, **kw)

    monkeypatch.setattr(triton_moe, "routed_experts", spy)
    experts = _experts().to("cuda", dtype)
    x, weights, ids, grad_out = (t.to("cuda") for t in _batch())
    x, weights, grad_out = x.to(dtype).requires_grad_(), weights.to(dtype).requires_grad_(), grad_out.to(dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        experts(x, weights, ids).backward(grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    fits = kernels.grouped_mm_fits(x, experts.gate_up_proj, experts.down_proj)
    assert calls == ["grouped_mm" if fits else "triton"]
    assert fits == (dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10))
    assert all(t.grad is not None for t in (x, weights, experts.gate_up_proj, experts.down_proj))


def test_autocast_training_on_cuda_runs_the_experts_in_bfloat16_with_float32_gradients():
    """Under bf16 autocast over float32 weights (the recipes' training precision), the experts run in bf16 and
    the gradients reach the float32 parameters, near the float32 ones."""
    reason = devices.skip_reason("cuda")
    if reason:
        pytest.skip(reason)
    experts = _experts().to("cuda")
    x, weights, ids, grad_out = (t.to("cuda") for t in _batch())
    want = _grads(experts, x, weights, ids, grad_out)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _grads(experts, x, weights, ids, grad_out)
    assert got[0].dtype == torch.bfloat16 and got[3].dtype == torch.float32
    for a, b in zip(got, want):
        assert (a.float() - b).abs().max() <= 3e-2 * b.abs().max()


def _padded_and_unpadded(m, ids, lengths, routing):
    """For routing replay off and on: (hidden states of the real tokens, gradients) of a loss over them, from
    the whole padded batch and from the real tokens only (token_index)."""
    T = ids.shape[1]
    real = torch.arange(T, device=ids.device)[None] < torch.tensor(lengths, device=ids.device)[:, None]
    token_index = real.flatten().nonzero()[:, 0]
    runs = []
    for replay in (None, routing):
        for index in (None, token_index):
            m.zero_grad()
            hidden = m.hidden_states(ids, routing=replay, token_index=index)
            hidden[real].square().mean().backward()
            runs.append((hidden[real].detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                 if p.grad is not None}))
    return runs


def test_routing_replay_and_real_token_feed_forward_train_alike_on(device):
    """On CUDA, where the MoE layers train through the kernels' dispatch: token_index (the feed-forward on the
    real tokens only) gives the padded batch's real hidden states and every gradient, with and without routing
    replay (the experts forced), and all four runs give the CPU's."""
    if device == "cpu":
        pytest.skip("the CPU case is tests/test_model_parts.py::"
                    "test_feed_forward_on_the_real_tokens_only_gives_the_same_outputs_and_gradients")
    torch.manual_seed(0)
    m = build_model(preset_config("micro", vocab_size=61), seed=4).train()
    lengths = [9, 4, 7]
    ids = torch.randint(3, 61, (len(lengths), max(lengths)))
    M, K = len(m.moe_layers()), m.config.num_experts_per_tok
    routing = torch.stack([torch.randperm(8)[:K] for _ in range(ids.numel() * M)]).view(*ids.shape, M, K)
    on_cpu = _padded_and_unpadded(m, ids, lengths, routing)
    on_device = _padded_and_unpadded(m.to(device), ids.to(device), lengths, routing.to(device))
    for (out, grads), (out_cpu, grads_cpu) in zip(on_device, on_cpu):
        assert any("experts.gate_up_proj" in n for n in grads) and grads.keys() == grads_cpu.keys()
        torch.testing.assert_close(out.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
        for n in grads:
            torch.testing.assert_close(grads[n].cpu(), grads_cpu[n], atol=1e-4, rtol=1e-3, msg=n)
    for padded, unpadded in (on_device[:2], on_device[2:]):
        torch.testing.assert_close(unpadded[0], padded[0], atol=1e-5, rtol=1e-5)
        for n in padded[1]:
            torch.testing.assert_close(unpadded[1][n], padded[1][n], atol=1e-5, rtol=1e-4, msg=n)
