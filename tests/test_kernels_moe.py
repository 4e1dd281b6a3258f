"""model.kernels' MoE dispatch: permute / un-permute and the grouped GEMM (plain and SwiGLU) in Triton against
the PyTorch references, with empty experts and tiles cut by expert boundaries; the reference routed experts
against the model's own `Experts`."""

from __future__ import annotations

import pytest
import torch

from tests.kernels_helpers import device  # noqa: F401  (the fixture)

from model import kernels  # isort: skip
from model.kernels import moe, reference  # isort: skip
from model.moe import Experts  # isort: skip


def _routing(N, K, E, on, used=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    used = used or E  # experts past `used` get no tokens
    ids = torch.stack([torch.randperm(used, generator=g)[:K] for _ in range(N)]) if N else torch.zeros(0, K).long()
    return ids.to(on), torch.rand(N, K, generator=g).to(on)


CASES = [(5, 2, 4, 20, 12, None), (70, 3, 8, 33, 40, 5), (1, 1, 3, 16, 16, None), (0, 2, 4, 16, 8, None)]
IDS = lambda c: f"N{c[0]}K{c[1]}E{c[2]}D{c[3]}I{c[4]}" + ("-empty" if c[5] else "")  # noqa: E731


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_permute_and_unpermute_match_reference(case, device):  # noqa: F811
    N, K, E, D, _, used = case
    ids, weights = _routing(N, K, E, device, used)
    x = torch.randn(N, D).to(device)
    got, want = kernels.moe_permute(x, ids, E, impl="triton"), kernels.moe_permute(x, ids, E, impl="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    xs, _, inverse, offsets = got
    assert offsets[-1] == N * K and offsets.dtype == torch.int32
    torch.testing.assert_close(kernels.moe_unpermute(xs, inverse, weights, impl="triton"),
                               kernels.moe_unpermute(xs, inverse, weights, impl="reference"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("swiglu", [False, True])
def test_triton_grouped_gemm_matches_reference(case, swiglu, device):  # noqa: F811
    N, K, E, D, I, used = case
    ids, _ = _routing(N, K, E, device, used)
    xs, _, _, offsets = kernels.moe_permute(torch.randn(N, D).to(device), ids, E, impl="reference")
    w = (torch.randn(E, 2 * I if swiglu else I, D) / D**0.5).to(device)
    got = kernels.grouped_gemm(xs, w, offsets, swiglu, impl="triton")
    torch.testing.assert_close(got, kernels.grouped_gemm(xs, w, offsets, swiglu, impl="reference"),
                               atol=1e-5, rtol=1e-5)


def test_grouped_gemm_tile_plan_covers_every_row_once():
    offsets = torch.tensor([0, 0, 130, 131, 131, 200], dtype=torch.int32)  # empty experts, tiles cut by bounds
    expert, start, end = moe.tile_plan(offsets, 200, 64)
    assert len(expert) == -(-200 // 64) + 5
    covered = torch.cat([torch.arange(s, e) for s, e in zip(start.tolist(), end.tolist())])
    assert covered.tolist() == list(range(200))
    for e, s, t in zip(expert.tolist(), start.tolist(), end.tolist()):
        assert s == t or offsets[e] <= s < t <= offsets[e + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_routed_experts_match_the_models_experts(dtype, device):  # noqa: F811
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16)")
    N, K, E, D, I = 13, 2, 6, 24, 20
    experts = Experts(E, D, I)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    ids, weights = _routing(N, K, E, "cpu", used=4)
    x = torch.randn(N, D)
    with torch.no_grad():
        want = experts(x, weights, ids)
    on = lambda t: t.detach().to(device, dtype)  # noqa: E731
    got = kernels.routed_experts(on(x), weights.to(device), ids.to(device), on(experts.gate_up_proj),
                                 on(experts.down_proj), impl="triton")
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


# ----- training: the routed experts' backward ------------------------------------------------------------
TRAIN_CASES = [(5, 2, 4, 20, 12, None), (19, 3, 8, 33, 40, 5), (1, 1, 3, 16, 16, None), (0, 2, 4, 16, 8, None)]
GRADS = ("output", "d x", "d weights", "d gate_up_proj", "d down_proj")
# float32: tight, elementwise. float16 and bfloat16: loose, the error against each tensor's largest magnitude
# (both sides round the pre-activations, the expert outputs and every gradient to the dtype, in other orders).
SCALED_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _training_inputs(case, dtype, on, seed=0):
    """(x, weights, expert_ids, gate_up_proj, down_proj) with the float ones requiring grad, and d output."""
    N, K, E, D, I, used = case
    ids, weights = _routing(N, K, E, "cpu", used, seed)
    g = torch.Generator().manual_seed(seed + 1)
    leaf = lambda t: t.to(on, dtype).requires_grad_()  # noqa: E731
    inputs = (leaf(torch.randn(N, D, generator=g)), leaf(weights), ids.to(on),
              leaf(torch.randn(E, 2 * I, D, generator=g) / D**0.5), leaf(torch.randn(E, D, I, generator=g) / I**0.5))
    return inputs, torch.randn(N, D, generator=g).to(on, dtype)


def _output_and_grads(fn, inputs, grad_out):
    x, weights, ids, gate_up, down = inputs
    out = fn(x, weights, ids, gate_up, down)
    wrt = [t for t in (x, weights, gate_up, down) if t.requires_grad]
    return (out, *torch.autograd.grad(out, wrt, grad_out))


def _assert_match(got, want, dtype):
    for name, a, b in zip(GRADS, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
        elif b.numel():
            err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
            assert err <= SCALED_TOL[dtype] * max(scale, 1e-3), f"{name}: error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("case", TRAIN_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_routed_experts_gradients_match_the_references_autograd(case, dtype, device):  # noqa: F811
    """d x, d weights, d gate_up_proj, d down_proj of the Triton path (`moe.RoutedExperts`' own backward) against
    torch.autograd through the PyTorch reference: odd shapes, experts no token chose, one token, no tokens."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16): bf16 runs on CUDA")
    inputs, grad_out = _training_inputs(case, dtype, device)
    got = _output_and_grads(lambda *a: kernels.routed_experts(*a, impl="triton"), inputs, grad_out)
    want = _output_and_grads(lambda *a: kernels.routed_experts(*a, impl="reference"), inputs, grad_out)
    _assert_match(got, want, dtype)


def test_triton_routed_experts_backward_with_frozen_experts(device):  # noqa: F811
    """Only x and the routing weights require grad (the projections frozen): the same gradients for those."""
    inputs, grad_out = _training_inputs((9, 2, 5, 24, 16, 4), torch.float32, device)
    inputs = (*inputs[:3], inputs[3].detach(), inputs[4].detach())
    got = _output_and_grads(lambda *a: kernels.routed_experts(*a, impl="triton"), inputs, grad_out)
    want = _output_and_grads(lambda *a: kernels.routed_experts(*a, impl="reference"), inputs, grad_out)
    assert len(got) == 3
    _assert_match(got, want, torch.float32)


def test_grouped_outer_is_each_experts_transposed_product(device):  # noqa: F811
    """The weights' gradient kernel: out[e] = a_e^T b_e over expert e's rows, zeros for the experts with none."""
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 0, 37, 38, 38, 70], dtype=torch.int32)
    a, b = torch.randn(70, 19, generator=g), torch.randn(70, 66, generator=g)
    want = torch.stack([a[s:t].T @ b[s:t] for s, t in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    got = moe.grouped_outer(a.to(device), b.to(device), offsets.to(device), torch.float32)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TRAIN_CASES[:3], ids=IDS)
def test_grouped_mm_gemms_give_the_triton_gradients(case, device):  # noqa: F811
    """On a GPU where `grouped_mm_fits` (bf16, Hopper or Blackwell), the training path's matmuls in
    torch._grouped_mm: the same output and gradients as with Triton's grouped GEMMs, and as the reference."""
    inputs, grad_out = _training_inputs((case[0], case[1], case[2], 32, 24, case[5]), torch.bfloat16, device)
    if not kernels.grouped_mm_fits(inputs[0], inputs[3], inputs[4]):
        pytest.skip("torch._grouped_mm serves bf16 on a CUDA GPU of capability 9.x or 10.x only")
    got = _output_and_grads(lambda *a: moe.routed_experts(*a, gemm="grouped_mm"), inputs, grad_out)
    _assert_match(got, _output_and_grads(lambda *a: moe.routed_experts(*a, gemm="triton"), inputs, grad_out),
                  torch.bfloat16)
    _assert_match(got, _output_and_grads(reference.routed_experts, inputs, grad_out), torch.bfloat16)
