"""model.kernels.paged_latent_attention: the Triton flash-decoding kernel against the PyTorch reference,
over odd shapes, block sizes that are not a multiple of the tile, empty and one-token contexts."""

from __future__ import annotations

import pytest
import torch

from tests.kernels_helpers import device  # noqa: F401  (the fixture)

from model import kernels  # isort: skip
from model.kernels import _triton, decode_attention, reference  # isort: skip


def _paged(B, H, rank, dr, block_size, lengths, dtype, on, W=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = W or max(1, max(-(-n // block_size) for n in lengths))
    n_blocks = B * W + 1
    pool = torch.randn(n_blocks * block_size, rank + dr, generator=g).to(dtype)
    tables = torch.randperm(n_blocks, generator=g)[: B * W].view(B, W).int()
    q = torch.randn(B, H, rank + dr, generator=g).to(dtype)
    return [t.to(on) for t in (q, pool, tables, torch.tensor(lengths))]


CASES = [  # B, H, rank, dr, block_size, lengths
    (2, 3, 32, 16, 5, [7, 0]),  # an empty context; 5 is no multiple of the 32-position tile
    (3, 20, 24, 8, 16, [1, 40, 33]),  # two head tiles, one-token context, rank and rope dim not powers of two
    (1, 16, 64, 16, 3, [100]),  # many tiles, one sequence: several splits
    (4, 2, 16, 16, 64, [64, 65, 2, 127]),  # block larger than the tile
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}r{c[2]}dr{c[3]}bs{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_decode_attention_matches_reference(case, dtype, device):  # noqa: F811
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton's interpreter multiplies bfloat16 wrongly (numpy has no bfloat16)")
    B, H, rank, dr, bs, lengths = case
    q, pool, tables, lens = _paged(B, H, rank, dr, bs, lengths, dtype, device)
    out = kernels.paged_latent_attention(q, pool, tables, lens, bs, rank, 0.3, impl="triton")
    want = reference.paged_latent_attention(q, pool, tables, lens, bs, rank, 0.3)
    assert out.shape == (B, H, rank) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
    assert not out[torch.tensor(lengths, device=device) == 0].any()  # an empty context gives zeros


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_attention_split_count_does_not_change_the_result(splits, device):  # noqa: F811
    q, pool, tables, lens = _paged(2, 4, 32, 16, 7, [50, 9], torch.float32, device)
    out = decode_attention.paged_latent_attention(q, pool, tables, lens, 7, 32, 0.2, splits=splits)
    torch.testing.assert_close(out, reference.paged_latent_attention(q, pool, tables, lens, 7, 32, 0.2))


def test_reference_decode_attention_matches_the_models_gathered_attention():
    """The reference is the model's own decode attention (`LatentDecode.attention`) over the gathered context."""
    from model.attention import LatentDecode

    q, pool, tables, lens = _paged(3, 4, 32, 16, 4, [9, 1, 16], torch.float32, "cpu")
    S = int(lens.max())
    pos = torch.arange(S)
    slots = tables.long().gather(1, (pos // 4).expand(3, S)) * 4 + pos % 4
    context = pool[torch.where(pos < lens[:, None], slots, 0)]
    bias = torch.zeros(3, S).masked_fill(pos >= lens[:, None], float("-inf"))
    decode = LatentDecode(4, 8, 16, 32, 0.25, None, 1e-6)
    torch.testing.assert_close(reference.paged_latent_attention(q, pool, tables, lens, 4, 32, 0.25),
                               decode.attention(q, context, bias))


def test_dispatch_picks_triton_on_cuda_and_reference_on_a_cpu_without_the_cpp_ops(monkeypatch):
    monkeypatch.delenv("R1_GRPO_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_native", lambda: None)
    assert kernels.select_impl(torch.device("cpu"), torch.float32, cpu_dtypes=(torch.float32,)) == "reference"
    monkeypatch.setattr(kernels, "_native", lambda: object())
    assert kernels.select_impl(torch.device("cpu"), torch.float32, cpu_dtypes=(torch.float32,)) == "cpu"
    assert kernels.select_impl(torch.device("cpu"), torch.bfloat16, cpu_dtypes=(torch.float32,)) == "reference"  # not a dtype it takes
    assert kernels.select_impl(torch.device("cpu"), torch.bfloat16, cpu_dtypes=(torch.float32, torch.bfloat16)) == "cpu"
    assert kernels.select_impl(torch.device("cpu"), torch.float16, cpu_dtypes=(torch.float32, torch.bfloat16)) == "reference"
    assert kernels.select_impl(torch.device("cpu"), torch.float32) == "reference"  # no C++ op
    assert kernels.select_impl(torch.device("cpu"), torch.float32, "triton") == "triton"
    monkeypatch.setenv("R1_GRPO_KERNELS", "reference")
    assert kernels.select_impl(torch.device("cpu"), torch.float32, cpu_dtypes=(torch.float32,)) == "reference"
    with pytest.raises(ValueError, match="no C\\+\\+ op"):
        kernels.select_impl(torch.device("cpu"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="takes torch.float32, not torch.bfloat16"):
        kernels.select_impl(torch.device("cpu"), torch.bfloat16, "cpu", cpu_dtypes=(torch.float32,))
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        kernels.select_impl(torch.device("cpu"), torch.float32, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: on CUDA the Triton path is the default")
def test_dispatch_chooses_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("R1_GRPO_KERNELS", raising=False)
    assert kernels.select_impl(torch.device("cuda"), torch.bfloat16, cpu_dtypes=(torch.float32, torch.bfloat16)) == "triton"
    calls = []
    monkeypatch.setattr(decode_attention, "paged_latent_attention", lambda *a, **k: calls.append(1) or a[0][..., :8])
    q, pool, tables, lens = _paged(1, 2, 8, 16, 4, [3], torch.bfloat16, "cuda")
    kernels.paged_latent_attention(q, pool, tables, lens, 4, 8, 1.0)
    assert calls == [1]


def test_eager_decode_over_a_paged_view_runs_the_dispatched_kernel(monkeypatch):
    """`Block.decode` over a `PagedCacheView` attends through `model.kernels` (here forced to the Triton kernel,
    interpreted) and gives the logits of the decode over the same context listed slot by slot."""
    from model import LatentCache, build_model
    from model.cache import CacheView, PagedCacheView
    from model.presets import preset_config

    if not _triton.interpreting():
        pytest.skip("needs Triton's interpreter")
    model = build_model(preset_config("micro", vocab_size=61, num_hidden_layers=2), seed=1).eval()
    bs, g = 3, torch.Generator().manual_seed(4)
    cache = LatentCache(model.config, num_slots=10 * bs)
    cache.data.normal_(generator=g)
    tables = torch.tensor([[7, 2, 9], [4, 0, 0]], dtype=torch.int32)
    lengths = torch.tensor([8, 2])
    write = torch.tensor([[9 * bs + 1], [4 * bs + 1]])
    paged = PagedCacheView(cache, write, None, block_tables=tables, lengths=lengths, block_size=bs, max_length=8)
    paged.read(0)  # works out the slots the tables name
    listed = CacheView(cache, write, paged.context_slots)
    paged.context_slots = None
    ids, positions = torch.tensor([[5], [6]]), (lengths - 1)[:, None]
    calls = []
    real = decode_attention.paged_latent_attention
    monkeypatch.setattr(decode_attention, "paged_latent_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("R1_GRPO_KERNELS", "triton")
    with torch.no_grad():
        got = model(ids, positions=positions, cache=paged, absorb=True)
    monkeypatch.setenv("R1_GRPO_KERNELS", "reference")
    with torch.no_grad():
        want = model(ids, positions=positions, cache=listed, absorb=True)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
