"""The samplers: the counter sampler's noise is keyed by (seed, position, token) alone, so a seeded row draws
alike in any batch and on any run; its draws follow the filtered probabilities; the engine runs on it."""

import math

import devices
import pytest
import torch

from grpo.rollout import SamplingParams
from grpo.rollout.engine import Engine
from grpo.rollout.sampler import counter_exponential, counter_uniform, filter_probs, sample
from model import build_model
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer

device = devices.device  # the fixture: "cpu", and "cuda" where there is one
TOK = build_char_tokenizer()
V = len(TOK)


def test_counter_noise_of_a_row_is_the_same_in_any_batch(device):
    seeds = torch.tensor([3, 2**62 + 11, 7, 0], device=device)
    positions = torch.tensor([0, 5, 5, 100], device=device)
    batch = counter_uniform(seeds, positions, 1000)
    for b in range(4):
        alone = counter_uniform(seeds[b:b + 1], positions[b:b + 1], 1000)
        assert torch.equal(alone[0], batch[b])
    reversed_batch = counter_uniform(seeds.flip(0), positions.flip(0), 1000)
    assert torch.equal(reversed_batch.flip(0), batch)
    assert batch.min() > 0 and batch.max() < 1
    assert torch.isfinite(counter_exponential(seeds, positions, 1000)).all()


def test_counter_noise_differs_between_seeds_positions_and_tokens(device):
    u = counter_uniform(torch.tensor([1, 2, 1], device=device), torch.tensor([0, 0, 1], device=device), 4096)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert u[0].unique().numel() > 4000  # tokens of one row are not repeats of each other
    # Uniform on (0, 1): mean 1/2, variance 1/12, and no correlation between neighbours.
    flat = counter_uniform(torch.arange(16, device=device), torch.zeros(16, dtype=torch.int64, device=device), 4096)
    assert abs(flat.mean().item() - 0.5) < 0.01
    assert abs(flat.var().item() - 1 / 12) < 0.002
    neighbours = torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]
    assert abs(neighbours.item()) < 0.01


def test_sample_needs_exactly_one_source_of_noise():
    logits = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="exactly one source of noise"):
        sample(logits, [SamplingParams()])
    with pytest.raises(ValueError, match="needs positions"):
        sample(logits, [SamplingParams()], seeds=torch.tensor([1]))


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 99.9% point)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic of counts [V] against n draws of probs [V], rare bins (expected < 5) pooled."""
    expected = probs * n
    big = expected >= 5
    observed, expect = counts[big], expected[big]
    if (expected[~big] > 0).any():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expect = torch.cat([expect, expected[~big].sum()[None]])
    return ((observed - expect) ** 2 / expect).sum().item(), len(observed) - 1


@pytest.mark.parametrize("filters", [{}, {"top_k": 12}, {"top_p": 0.8}, {"min_p": 0.05}, {"top_k": 20, "top_p": 0.9}])
def test_counter_draws_follow_the_filtered_probabilities(device, filters):
    torch.manual_seed(0)
    logits = torch.randn(1, 64, device=device) * 0.7
    sp = SamplingParams(temperature=0.8, **filters)
    probs = torch.softmax(logits.float() / 0.8, dim=-1)
    target = filter_probs(probs, torch.tensor([sp.top_k], device=device),
                          torch.tensor([sp.top_p], device=device), torch.tensor([sp.min_p], device=device))[0].cpu()
    n = 6000  # one row per draw: seeds 0..n-1 at one position
    tokens, _ = sample(logits.expand(n, -1), [sp] * n, seeds=torch.arange(n, device=device),
                       positions=torch.full((n,), 3, device=device))
    counts = torch.bincount(torch.tensor(tokens), minlength=64).float()
    assert counts[target == 0].sum() == 0, "a filtered-out token was drawn"
    chi2, df = chi_square(counts, target, n)
    assert df >= 3
    assert chi2 < chi_square_critical(df), f"chi2 {chi2:.1f} with {df} degrees of freedom"
    tv = 0.5 * (counts / n - target).abs().sum().item()
    assert tv < 0.05, f"total variation {tv:.3f}"


def test_counter_logprobs_are_the_temperature_log_softmax(device):
    logits = torch.randn(3, 50, device=device)
    params = [SamplingParams(temperature=0.7), SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_k=5)]
    tokens, logprobs = sample(logits, params, seeds=torch.tensor([1, 0, 2], device=device),
                              positions=torch.zeros(3, dtype=torch.int64, device=device))
    assert tokens[1] == int(logits[1].argmax())
    assert tokens[2] in logits[2].topk(5).indices.tolist()
    for b, (t, sp) in enumerate(zip(tokens, params)):
        temperature = sp.temperature or 1.0
        expected = torch.log_softmax(logits[b].float() / temperature, dim=-1)[t].item()
        assert logprobs[b] == pytest.approx(expected, abs=1e-5)


@pytest.fixture(scope="module")
def cpu_model():
    m = build_model(preset_config("micro", vocab_size=V), seed=1).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return m


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]


def engine_on(cpu_model, device, **kwargs):
    model = cpu_model if device == "cpu" else build_model(cpu_model.config).to(device).eval()
    if device != "cpu":
        model.load_state_dict(cpu_model.state_dict())
    return Engine(model, block_size=4, num_blocks=128, **kwargs)


def test_counter_engine_seeded_completions_are_the_same_in_any_batch(cpu_model, device):
    engine = engine_on(cpu_model, device, sampler="counter")
    sp = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_tokens=8, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], sp)[0]
    again = engine.generate([PROMPTS[0]], sp)[0]
    batched = engine.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(n=2, max_tokens=5), sp])[1]
    tokens = [c.token_ids for c in alone.completions]
    assert tokens == [c.token_ids for c in again.completions] == [c.token_ids for c in batched.completions]
    assert len({tuple(t) for t in tokens}) > 1  # the samples of a group differ from each other


def test_counter_engine_unseeded_rows_differ(cpu_model, device):
    engine = engine_on(cpu_model, device, sampler="counter")
    out = engine.generate([PROMPTS[0]] * 2, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True))
    tokens = [tuple(c.token_ids) for o in out for c in o.completions]
    assert len(set(tokens)) >= 6  # 8 unseeded samples of one prompt: no shared stream


def test_counter_engine_preempted_sequences_draw_the_same(cpu_model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    sp = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
          SamplingParams(n=3, temperature=1.0, max_tokens=14, seed=5, ignore_eos=True),
          SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=14, seed=6, ignore_eos=True)]
    roomy = Engine(cpu_model, block_size=4, num_blocks=256, sampler="counter").generate(prompts, sp)
    tiny = Engine(cpu_model, block_size=4, num_blocks=14, sampler="counter")
    cramped = tiny.generate(prompts, sp)
    assert tiny.last_stats["preemptions"] > 0
    assert [[c.token_ids for c in o.completions] for o in roomy] == [[c.token_ids for c in o.completions] for o in cramped]


def test_engine_sampler_defaults_and_refuses_unknown_names(cpu_model):
    assert Engine(cpu_model, num_blocks=8).sampler == "generator"  # CPU: the recorded results' sampler
    with pytest.raises(ValueError, match=r"sampler='philox'.*'generator', 'counter'"):
        Engine(cpu_model, num_blocks=8, sampler="philox")


def greedy_reference(model, prompt, n):
    """The plain loop: recompute the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_plain_loop_on_each_device(cpu_model, device):
    engine = engine_on(cpu_model, device)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.completions[0].token_ids == greedy_reference(engine.model, prompt, 6)
