"""The rollout engine: exactness against a plain loop, sampling, stops, prefix sharing, preemption."""

import math

import pytest
import torch

from grpo.rollout import SamplingParams
from grpo.rollout.block_manager import BlockManager
from grpo.rollout.engine import Engine
from grpo.rollout.sampler import filter_probs
from grpo.rollout.sequence import Sequence
from model import build_model
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
V = len(TOK)


def sharp_model(seed: int = 1, scale: float = 5.0):
    """Weights scaled up so next-token distributions are far from uniform."""
    m = build_model(preset_config("micro", vocab_size=V), seed=seed).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return m


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def greedy_reference(model, prompt, n):
    """The plain loop: recompute the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34]]


def test_greedy_generation_equals_plain_loop_for_ragged_batch(model):
    engine = Engine(model, block_size=4, num_blocks=64)
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        assert out.completions[0].token_ids == greedy_reference(model, prompt, 12)
        assert out.completions[0].finish_reason == "length"


def test_logprobs_equal_the_trainers_recomputed_logprobs(model):
    engine = Engine(model, block_size=4, num_blocks=128)
    T = 0.7
    outputs = engine.generate(PROMPTS, SamplingParams(n=3, temperature=T, top_k=20, max_tokens=10, seed=0,
                                                      ignore_eos=True))
    for prompt, out in zip(PROMPTS, outputs):
        for c in out.completions:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1] / T, dim=-1)
            expected = logp.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_whatever_it_is_batched_with(model):
    engine = Engine(model, block_size=4, num_blocks=128)
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=123, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], sp)[0]
    again = engine.generate([PROMPTS[0]], sp)[0]
    batched = engine.generate([PROMPTS[1], PROMPTS[0]], [SamplingParams(n=2, max_tokens=5), sp])[1]
    tokens = [c.token_ids for c in alone.completions]
    assert tokens == [c.token_ids for c in again.completions] == [c.token_ids for c in batched.completions]
    assert len({tuple(t) for t in tokens}) > 1  # the samples of a group differ from each other


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 99.9% point)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_token_frequencies_match_softmax(temperature):
    model = sharp_model(seed=2, scale=2.0)
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1] / temperature, dim=-1)
    n = 4000
    engine = Engine(model, block_size=4, num_blocks=n + 8, max_num_seqs=n)
    out = engine.generate([prompt], SamplingParams(n=n, temperature=temperature, max_tokens=1, seed=7, ignore_eos=True))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out[0].completions]), minlength=V).float()
    expected = probs * n
    big = expected >= 5  # pool the rare tokens into one bin, as the test requires
    observed, expect = counts[big], expected[big]
    if (~big).any():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        expect = torch.cat([expect, expected[~big].sum()[None]])
    chi2 = ((observed - expect) ** 2 / expect).sum().item()
    df = len(observed) - 1
    assert df >= 5
    assert chi2 < chi_square_critical(df), f"chi2 {chi2:.1f} with {df} degrees of freedom"


def test_filters_keep_what_top_k_top_p_and_min_p_promise():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 4)
    top_k = torch.tensor([2, 0, 0, 0])
    top_p = torch.tensor([1.0, 0.75, 1.0, 0.6])
    min_p = torch.tensor([0.0, 0.0, 0.4, 0.0])
    out = filter_probs(probs, top_k, top_p, min_p)
    torch.testing.assert_close(out[0], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # top-2
    torch.testing.assert_close(out[1], torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]))  # 0.4 + 0.3 < 0.75: needs 0.2 too
    torch.testing.assert_close(out[2], torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]))  # >= 0.4 * 0.4 = 0.16
    torch.testing.assert_close(out[3], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # 0.4 < 0.6, 0.7 >= 0.6


def test_sampled_tokens_stay_inside_top_k_and_top_1_is_greedy(model):
    engine = Engine(model, block_size=4, num_blocks=256)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    top1 = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=6, seed=1, ignore_eos=True))
    assert [o.completions[0].token_ids for o in top1] == [o.completions[0].token_ids for o in greedy]
    out = engine.generate([PROMPTS[0]], SamplingParams(n=16, temperature=1.5, top_k=3, max_tokens=1, seed=2))[0]
    with torch.no_grad():
        allowed = set(model(torch.tensor([PROMPTS[0]]))[0, -1].topk(3).indices.tolist())
    assert {c.token_ids[0] for c in out.completions} <= allowed


def test_stop_tokens_stop_strings_and_max_tokens(model):
    engine = Engine(model, tokenizer=TOK, block_size=4, num_blocks=64)
    prompt = PROMPTS[1]
    full = greedy_reference(model, prompt, 10)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    by_token = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[full[4]],
                                                        ignore_eos=True))[0].completions[0]
    cut = full.index(full[4]) + 1
    assert by_token.token_ids == full[:cut] and by_token.finish_reason == "stop"
    stop_text = TOK.decode(full[2:4])
    by_string = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=[stop_text],
                                                         ignore_eos=True))[0].completions[0]
    assert stop_text in by_string.text and by_string.finish_reason == "stop"
    assert stop_text not in TOK.decode(by_string.token_ids[:-1]) and by_string.token_ids == full[:len(by_string.token_ids)]
    by_length = engine.generate([prompt], sp)[0].completions[0]
    assert len(by_length.token_ids) == 10 and by_length.finish_reason == "length"


def test_eos_ends_a_sequence_unless_ignored(model):
    engine = Engine(model, tokenizer=TOK, block_size=4, num_blocks=64)
    full = greedy_reference(model, PROMPTS[2], 8)
    engine.eos_ids = {full[3]}
    stopped = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8))[0].completions[0]
    assert stopped.token_ids == full[:full.index(full[3]) + 1] and stopped.finish_reason == "stop"
    ignored = engine.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert ignored.completions[0].token_ids == full


def test_prefix_sharing_allocates_the_prompt_blocks_once(model):
    engine = Engine(model, block_size=4, num_blocks=64)
    prompt = list(range(3, 13))  # 10 tokens: blocks of 4, 4 and a partly filled 2
    engine.generate([prompt], SamplingParams(n=8, max_tokens=1, seed=0))
    assert engine.last_stats["blocks_allocated"] == 3  # not 8 x 3
    # Decoding writes into the shared, partly filled block: 7 samples copy it, the last one keeps it.
    engine.generate([prompt], SamplingParams(n=8, max_tokens=3, seed=0, ignore_eos=True))
    assert engine.last_stats["blocks_allocated"] == 3 + 7
    # Two requests with the same prompt share one prefill too.
    engine.generate([prompt, prompt], SamplingParams(n=4, max_tokens=1, seed=0))
    assert engine.last_stats["blocks_allocated"] == 3


def test_block_manager_reference_counts_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = Sequence(list(range(6)), SamplingParams())
    bm.allocate(parent, 6)
    children = [Sequence(parent.token_ids, SamplingParams()) for _ in range(3)]
    for c in children:
        bm.fork(parent, c)
        c.num_cached = 6
    bm.free(parent)
    assert [bm.ref_count[b] for b in children[0].block_table] == [3, 3] and bm.num_free == 6
    assert bm.prepare_append(children[0]) == (1, 2)  # shared partial block copied to a fresh one
    assert bm.prepare_append(children[1]) == (1, 3)
    assert bm.prepare_append(children[2]) is None  # the last holder writes in place
    for c in children:
        bm.free(c)
    assert bm.num_free == 8 and sum(bm.ref_count) == 0


def test_preemption_under_a_tiny_pool_gives_the_same_results(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    sp = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
          SamplingParams(n=3, temperature=1.0, max_tokens=14, seed=5, ignore_eos=True),
          SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=14, seed=6, ignore_eos=True)]
    roomy = Engine(model, block_size=4, num_blocks=256).generate(prompts, sp)
    tiny = Engine(model, block_size=4, num_blocks=14)
    cramped = tiny.generate(prompts, sp)
    assert tiny.last_stats["preemptions"] > 0
    for a, b in zip(roomy, cramped):
        for ca, cb in zip(a.completions, b.completions):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-4, rtol=0)


def test_a_request_that_can_never_fit_is_refused(model):
    with pytest.raises(ValueError, match="needs 7 cache blocks but the pool has 4"):
        Engine(model, block_size=4, num_blocks=4).generate([[1, 2, 3]], SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        Engine(model, block_size=4, num_blocks=400).generate([[1, 2, 3]], SamplingParams(max_tokens=300))


@pytest.mark.parametrize("optimizer", ["sgd", "fused_adamw"])
def test_next_generate_sees_the_optimizer_step_without_a_copy(optimizer):
    """Also after fused AdamW, whose kernel updates the weights in place without moving their version
    counters (so a cache keyed on versions alone would keep the old absorbed weights)."""
    model = sharp_model(seed=3)
    engine = Engine(model, block_size=4, num_blocks=64)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = engine.generate(PROMPTS, sp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5) if optimizer == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    loss = model(torch.tensor([PROMPTS[1]])).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    after = engine.generate(PROMPTS, sp)
    assert [o.completions[0].token_ids for o in after] != [o.completions[0].token_ids for o in before]
    for prompt, out in zip(PROMPTS, after):
        assert out.completions[0].token_ids == greedy_reference(model, prompt, 8)
