"""model.kernels' MoE dispatch: permute / un-permute and the grouped GEMM (plain and SwiGLU) in Triton against
the PyTorch references, with empty experts and tiles cut by expert boundaries; the reference routed experts
against the model's own `Experts`."""

from __future__ import annotations

import pytest
import torch

from tests.kernels_helpers import device  # noqa: F401  (the fixture)

from model import kernels  # isort: skip
from model.kernels import moe  # isort: skip
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
