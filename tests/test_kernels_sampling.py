"""The counter sampler's Triton kernel against its PyTorch reference: the same tokens and log-probs, the
greedy rows, a row's draw independent of its batch, odd vocabulary sizes (masked tiles)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels_helpers import device  # noqa: F401  (the fixture)

from model import kernels  # isort: skip
from model.kernels import reference  # isort: skip


def _inputs(B: int, V: int, device, dtype=torch.float32, seed: int = 0):  # noqa: F811
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=gen) * 3).to(device, dtype)
    temperature = (torch.rand(B, generator=gen) + 0.5).to(device)
    seeds = torch.randint(0, 2**62, (B,), generator=gen).to(device)
    positions = torch.randint(0, 1000, (B,), generator=gen).to(device)
    greedy = (torch.arange(B) % 3 == 0).to(device)
    return logits, temperature, seeds, positions, greedy


@pytest.mark.parametrize("B,V", [(1, 7), (5, 1000), (9, 3001)])
def test_triton_counter_sample_matches_reference(B, V, device):  # noqa: F811
    logits, temperature, seeds, positions, greedy = _inputs(B, V, device)
    tokens, logprobs = kernels.counter_sample(logits, temperature, seeds, positions, greedy, impl="triton")
    ref_tokens, ref_logprobs = reference.counter_sample(logits, temperature, seeds, positions, greedy)
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    torch.testing.assert_close(logprobs.cpu(), ref_logprobs.cpu(), atol=1e-5, rtol=1e-5)
    z = logits.float() / temperature[:, None]
    assert torch.equal(tokens[greedy].cpu(), z[greedy].argmax(-1).cpu())  # greedy rows take the argmax


def test_triton_counter_sample_of_a_row_is_the_same_in_any_batch(device):  # noqa: F811
    logits, temperature, seeds, positions, greedy = _inputs(6, 2000, device, seed=1)
    batch, _ = kernels.counter_sample(logits, temperature, seeds, positions, greedy, impl="triton")
    for b in (0, 4):
        one = slice(b, b + 1)
        alone, _ = kernels.counter_sample(logits[one], temperature[one], seeds[one], positions[one], greedy[one],
                                          impl="triton")
        assert alone.item() == batch[b].item()


def test_counter_sample_draws_follow_the_softmax():
    """The reference's draws over many keys follow softmax(logits / t) (the kernel equals it, above)."""
    V, n = 6, 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(n, V)
    temperature = torch.full((n,), 0.8)
    tokens, logprobs = reference.counter_sample(logits, temperature, torch.arange(n), torch.zeros(n, dtype=torch.int64),
                                                torch.zeros(n, dtype=torch.bool))
    expected = torch.softmax(logits[0] / 0.8, -1)
    freq = torch.bincount(tokens, minlength=V).float() / n
    assert (freq - expected).abs().max() < 0.015
    torch.testing.assert_close(logprobs, expected.log()[tokens])
