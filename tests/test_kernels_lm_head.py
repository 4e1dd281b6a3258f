"""model.kernels.lm_head_logprobs: both Triton paths' log-probs, entropies and gradients against the chunked
PyTorch reference (the fused kernel, "triton", and "chunked_triton": cuBLAS matmuls a chunk of tokens at a time
with Triton row kernels, the CUDA default), the reference against grpo's token log-probs (the trainer's
definition), and the dispatch's choice between them."""

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


@pytest.mark.parametrize("impl", ["triton", "chunked_triton"])
def test_lm_head_forward_only_and_scalar_temperature(impl, device):  # noqa: F811
    hidden, weight, targets, _ = _inputs(7, 40, 16, torch.float32, device)
    with torch.no_grad():
        got = kernels.lm_head_logprobs(hidden.view(1, 7, 16), weight, targets.view(1, 7), 0.7, True, impl=impl)
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


# ----- chunked_triton: cuBLAS matmuls a chunk of tokens at a time, Triton row kernels ---------------------------
def _close(got, want, names, atol, rtol):
    for g, w, name in zip(got, want, names):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 tokens and rows read 32 vocabulary entries a step, so small shapes cross both boundaries."""
    from model.kernels import lm_head_chunked

    monkeypatch.setattr(lm_head_chunked, "chunk_rows", lambda vocab, dtype, logits_bytes=None: 4)
    monkeypatch.setattr(lm_head_chunked, "BLOCK_V", 32)


@pytest.mark.parametrize("shape", [(1, 17, 16), (5, 70, 20), (13, 130, 33), (9, 64, 8)],
                         ids=lambda s: f"N{s[0]}V{s[1]}D{s[2]}")
@pytest.mark.parametrize("with_entropy", [False, True])
def test_chunked_triton_logprobs_and_gradients_match_reference(shape, with_entropy, device, small_chunks):  # noqa: F811
    """N not a multiple of the 4-token chunk, V not a multiple of the 32-entry row step, a temperature per token."""
    args = _inputs(*shape, torch.float32, device)
    names = ["logprobs", "entropy", "d_hidden", "d_weight"] if with_entropy else ["logprobs", "d_hidden", "d_weight"]
    _close(_run("chunked_triton", *args, with_entropy), _run("reference", *args, with_entropy), names, 2e-5, 2e-5)


def test_chunked_triton_at_its_own_block_and_chunk_sizes(device):  # noqa: F811
    """The default row step (4,096 entries) with V just past it, and one chunk for all tokens."""
    args = _inputs(6, 4099, 8, torch.float32, device)
    _close(_run("chunked_triton", *args, True), _run("reference", *args, True),
           ["logprobs", "entropy", "d_hidden", "d_weight"], 2e-5, 2e-5)


@pytest.mark.parametrize("used", ["masked_logprobs", "entropy_only", "logprobs_only", "nothing"])
def test_chunked_triton_gradients_of_one_output_masked_rows_and_frozen_inputs(used, device, small_chunks):  # noqa: F811
    """An output left out of the loss has no gradient (the row kernel skips its term); masked rows give zero
    d(hidden); a frozen weight or hidden gets none."""
    hidden, weight, targets, temperature = _inputs(11, 50, 12, torch.float32, device)
    mask = (torch.arange(11, device=device) % 3 != 0).float()
    if used == "nothing":
        mask.zero_()

    def grads(impl, inputs):
        h, w = inputs
        lp, ent = kernels.lm_head_logprobs(h, w, targets, temperature, True, impl=impl)
        loss = {"entropy_only": lambda: ent.sum()}.get(used, lambda: (lp * mask).sum())()
        wrt = [x for x in inputs if x.requires_grad]
        return torch.autograd.grad(loss, wrt)

    for inputs in ((hidden, weight), (hidden, weight.detach()), (hidden.detach(), weight)):
        got, want = grads("chunked_triton", inputs), grads("reference", inputs)
        _close(got, want, ["first", "second"], 2e-5, 2e-5)
    d_hidden = grads("chunked_triton", (hidden, weight))[0]
    if used in ("masked_logprobs", "nothing"):
        assert (d_hidden[mask == 0] == 0).all()
    if used == "nothing":
        assert all((g == 0).all() for g in grads("chunked_triton", (hidden, weight)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_triton_half_precision_within_stated_tolerance(dtype, device, small_chunks):  # noqa: F811
    """Both paths round the logits to the matmul's dtype alike, then work in float32: log-probs and entropies
    agree to 1e-4. Gradients are rounded to `dtype` (d loss / d logits, then each matmul's result; d(W) per chunk
    where torch lacks addmm's out_dtype): within 2% of the reference's gradient norm."""
    args = _inputs(19, 100, 16, dtype, device)
    got, want = _run("chunked_triton", *args, True), _run("reference", *args, True)
    _close(got[:2], want[:2], ["logprobs", "entropy"], 1e-4, 1e-4)
    for g, w, name in zip(got[2:], want[2:], ["d_hidden", "d_weight"]):
        assert g.dtype == w.dtype == dtype, name
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 2e-2, name


def test_chunked_triton_with_tied_embeddings(device, small_chunks):  # noqa: F811
    """The LM head's weight is also the input embedding: its gradient sums both uses, as the reference's."""
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(40, 16, generator=g) / 4).to(device).requires_grad_()
    ids = torch.randint(0, 40, (2, 7), generator=g).to(device)
    targets = torch.randint(0, 40, (2, 7), generator=g).to(device)

    def run(impl):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) * 3.0)
        lp, ent = kernels.lm_head_logprobs(hidden, weight, targets, 0.8, True, impl=impl)
        return lp, ent, *torch.autograd.grad(lp.sum() - 0.1 * ent.sum(), [weight])

    _close(run("chunked_triton"), run("reference"), ["logprobs", "entropy", "d_weight"], 2e-5, 2e-5)


def test_chunk_rows_keep_a_chunks_logits_within_the_budget():
    from model.kernels import lm_head_chunked

    assert lm_head_chunked.chunk_rows(129280, torch.bfloat16) == 4096  # 1 GiB: 4,152 rows, whole 64-row tiles
    assert lm_head_chunked.chunk_rows(129280, torch.float32) == 2048
    assert lm_head_chunked.chunk_rows(100, torch.float32, logits_bytes=4000) == 10
    assert lm_head_chunked.chunk_rows(100, torch.float32, logits_bytes=0) == 1


def test_float32_sum_of_half_precision_matmuls():
    """d(W)'s accumulator: float32 += a @ b for float32 and for bfloat16 operands (here the fallback: a
    bfloat16 matmul added, as on a CPU or a torch without addmm's out_dtype)."""
    from model.kernels.lm_head_chunked import _add_matmul_

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(5, 4, generator=g)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        acc = torch.ones(6, 4)
        _add_matmul_(acc, a.to(dtype), b.to(dtype))
        assert acc.dtype == torch.float32
        torch.testing.assert_close(acc, 1 + a @ b, atol=tol, rtol=tol)


def test_lm_head_defaults_to_chunked_triton_on_cuda_and_reference_on_a_cpu(monkeypatch):
    """The choice without a GPU: a CUDA device named, Triton found."""
    monkeypatch.delenv("R1_GRPO_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels.select_impl(cuda, torch.bfloat16, entry="lm_head") == "chunked_triton"
    assert kernels.select_impl(cuda, torch.bfloat16) == "triton"  # the other entries: their one Triton kernel
    assert kernels.select_impl(cpu, torch.float32, entry="lm_head") == "reference"
    assert kernels.select_impl(cpu, torch.float32, "triton", entry="lm_head") == "triton"  # the fused kernel
    with pytest.raises(ValueError, match="unknown kernel implementation 'cpu' for lm_head"):
        kernels.select_impl(cpu, torch.float32, "cpu", entry="lm_head")
    with pytest.raises(ValueError, match="unknown kernel implementation 'chunked_triton'"):
        kernels.select_impl(cuda, torch.bfloat16, "chunked_triton")
    monkeypatch.setattr(kernels, "_triton_installed", lambda: False)
    assert kernels.select_impl(cuda, torch.bfloat16, entry="lm_head") == "reference"


@pytest.mark.parametrize("setting, lm_head, others", [
    ("triton", "triton", "triton"),
    ("lm_head=triton", "triton", "triton"),  # the fused LM head; the others by default
    ("reference, lm_head=chunked_triton", "chunked_triton", "reference"),
    ("lm_head=reference", "reference", "triton"),
])
def test_r1_grpo_kernels_names_one_for_every_entry_or_one_entrys(setting, lm_head, others, monkeypatch):
    monkeypatch.setattr(kernels, "_triton_installed", lambda: True)
    monkeypatch.setenv("R1_GRPO_KERNELS", setting)
    cuda = torch.device("cuda")
    assert kernels.select_impl(cuda, torch.bfloat16, entry="lm_head") == lm_head
    assert kernels.select_impl(cuda, torch.bfloat16) == others


@pytest.mark.parametrize("setting, module", [("lm_head=chunked_triton", "lm_head_chunked"), ("triton", "lm_head")])
def test_grpo_logprobs_run_the_chosen_triton_path(setting, module, device, monkeypatch):  # noqa: F811
    """grpo.logprobs goes through the dispatch: the chunked or the fused path, as chosen, with the chunked
    PyTorch values and gradients."""
    import importlib

    from grpo.logprobs import token_logprobs_and_entropy

    hidden, weight, targets, _ = _inputs(10, 70, 16, torch.float32, device)
    hidden, targets = hidden.view(2, 5, 16), targets.view(2, 5)
    monkeypatch.setenv("R1_GRPO_KERNELS", "reference")
    want = token_logprobs_and_entropy(hidden, weight, targets, 0.9, chunk_size=3)
    path, calls = importlib.import_module(f"model.kernels.{module}"), []
    entry = path.lm_head_logprobs
    monkeypatch.setattr(path, "lm_head_logprobs", lambda *a, **k: calls.append(1) or entry(*a, **k))
    monkeypatch.setenv("R1_GRPO_KERNELS", setting)
    got = token_logprobs_and_entropy(hidden, weight, targets, 0.9, chunk_size=3)
    assert calls and got[0].shape == (2, 5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    g_got = torch.autograd.grad(got[0].sum() + got[1].sum(), [hidden, weight])
    g_want = torch.autograd.grad(want[0].sum() + want[1].sum(), [hidden, weight])
    torch.testing.assert_close(g_got, g_want, atol=2e-5, rtol=2e-5)


def test_under_autocast_the_triton_paths_get_the_autocast_dtype_and_the_float32_weight_its_gradient(
        device, monkeypatch):  # noqa: F811
    """model.dtype: bfloat16 trains under autocast over float32 master weights: the reference's matmul runs in
    bfloat16 there, so the Triton path must be handed bfloat16 too (in float32 its matmuls would run ~10x
    slower on a GPU), with d(W) still reaching the float32 weight."""
    from grpo.logprobs import token_logprobs_and_entropy
    from model.kernels import lm_head_chunked

    hidden, weight, targets, _ = _inputs(12, 70, 16, torch.float32, device)
    seen = []
    entry = lm_head_chunked.lm_head_logprobs
    monkeypatch.setattr(lm_head_chunked, "lm_head_logprobs",
                        lambda h, w, *a, **k: seen.append((h.dtype, w.dtype)) or entry(h, w, *a, **k))
    results = {}
    for setting in ("reference", "lm_head=chunked_triton"):
        monkeypatch.setenv("R1_GRPO_KERNELS", setting)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            lp, ent = token_logprobs_and_entropy(hidden, weight, targets, 0.9)
        results[setting] = (lp, ent, *torch.autograd.grad(lp.sum() + ent.sum(), [hidden, weight]))
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    (*got, g_w), (*want, w_want) = results["lm_head=chunked_triton"], results["reference"]
    assert g_w.dtype == torch.float32
    torch.testing.assert_close(got[:2], want[:2], atol=2e-2, rtol=2e-2)  # both bf16 matmuls; rounding differs
    assert (g_w - w_want).norm() < 0.03 * w_want.norm()
    assert (got[2] - want[2]).norm() < 0.03 * want[2].norm()
