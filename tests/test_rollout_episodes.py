"""Multi-turn tool episodes on our engine: tool output appended as tokens, generation resumed from the cache."""

import devices
import pytest
import torch

from grpo.rollout import SamplingParams
from grpo.rollout.block_manager import BlockManager
from grpo.rollout.engine import Engine
from grpo.rollout.episodes import ToolCall, ToolResult, generate_episodes
from grpo.rollout.scheduler import Scheduler
from grpo.rollout.sequence import Sequence
from model import build_model
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_model(preset_config("micro", vocab_size=len(TOK)), seed=1).eval()


class EveryN:
    """A toolbox whose call is complete once a turn holds n tokens' text; its output names the turn's length."""

    def __init__(self, n: int, output: str = "[{}]"):
        self.n, self.output, self.batches = n, output, []

    def find_call(self, text):
        return ToolCall("echo", text) if len(text) >= self.n else None

    def run(self, calls):
        self.batches.append(len(calls))
        return [ToolResult(self.output.format(len(c.arguments))) for c in calls]

    def render(self, call, result):
        return result.output


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


@pytest.mark.parametrize("decode_path", ["eager", "buffers"])
def test_sampled_tokens_and_logprobs_equal_a_full_recompute_across_tool_turns(model, decode_path):
    """The policy's tokens after a tool turn are sampled from the whole prefix (tool tokens included): the
    engine's log-probs equal a plain forward over prompt + episode at every sampled position."""
    engine = Engine(model, TOK, block_size=4, num_blocks=256, decode_path=decode_path)
    prompt = TOK.encode("12+34=")
    outs, _ = generate_episodes(engine, [prompt], SamplingParams(n=3, max_tokens=30, seed=0, ignore_eos=True),
                                EveryN(5), max_tool_calls=3)
    for c in outs[0].completions:
        assert sum(c.tool_mask) > 0 and [k for k, _ in c.turns][:2] == ["policy", "tool"]
        assert [t for _, ids in c.turns for t in ids] == c.token_ids
        lp = full_logprobs(model, prompt + c.token_ids)
        for t, token in enumerate(c.token_ids):
            if c.tool_mask[t]:
                assert c.logprobs[t] == 0.0
            else:
                assert abs(lp[len(prompt) + t - 1, token].item() - c.logprobs[t]) < 1e-4


def test_greedy_episode_equals_a_plain_loop_that_appends_the_tool_text(model):
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    prompt = TOK.encode("7*8=")
    outs, _ = generate_episodes(engine, [prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                EveryN(4, output="<{}>"), max_tool_calls=2)
    ids, turn_start, calls = list(prompt), len(prompt), 0
    while len(ids) - len(prompt) < 20:  # the plain loop: recompute everything, append the tool's text
        ids.append(int(full_logprobs(model, ids)[-1].argmax()))
        text = TOK.decode(ids[turn_start:])
        if len(text) >= 4 and len(ids) - len(prompt) < 20:
            if calls == 2:  # max_tool_calls reached: the next complete call ends the episode
                break
            ids += TOK.encode(f"<{len(text)}>")[: 20 - (len(ids) - len(prompt)) - 1]
            turn_start, calls = len(ids), calls + 1
    assert outs[0].completions[0].token_ids == ids[len(prompt):]


def expected_prefill(prompts, outs) -> tuple[int, int]:
    """(the tokens an episode run must prefill, its resumes): the prompts once each, and per resume its tool
    tokens and the last sampled token (sampled, not yet fed); nothing already in the cache again."""
    tool_tokens = sum(sum(c.tool_mask) for o in outs for c in o.completions)
    resumes = sum(len(c.tool_calls) for o in outs for c in o.completions)
    return sum(map(len, prompts)) + tool_tokens + resumes, resumes


def test_cache_is_reused_across_turns_only_new_tokens_are_prefilled(model):
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    prompts = [TOK.encode("12+34="), TOK.encode("9*9=")]
    outs, _ = generate_episodes(engine, prompts, SamplingParams(n=2, max_tokens=24, seed=3, ignore_eos=True),
                                EveryN(3), max_tool_calls=3)
    expected, resumes = expected_prefill(prompts, outs)
    assert engine.last_stats["prefill_tokens"] == expected
    assert resumes == 12


def test_calls_of_one_step_reach_the_toolbox_together(model):
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    box = EveryN(3)
    generate_episodes(engine, [TOK.encode("1+1=")], SamplingParams(n=4, max_tokens=12, seed=0, ignore_eos=True),
                      box, max_tool_calls=2)
    assert sum(box.batches) == 8 and max(box.batches) > 1


def test_seeded_episode_is_reproducible_whatever_it_is_batched_with(model):
    prompt = TOK.encode("12+34=")
    sp = SamplingParams(n=2, max_tokens=24, seed=7, ignore_eos=True)
    alone, _ = generate_episodes(Engine(model, TOK, block_size=4, num_blocks=256), [prompt], sp, EveryN(4))
    again, _ = generate_episodes(Engine(model, TOK, block_size=4, num_blocks=256), [prompt], sp, EveryN(4))
    mixed, _ = generate_episodes(Engine(model, TOK, block_size=4, num_blocks=256, seed=5),
                                 [TOK.encode("5-3="), prompt], [SamplingParams(n=3, max_tokens=9), sp], EveryN(4))
    for a, b, c in zip(alone[0].completions, again[0].completions, mixed[1].completions):
        assert a.token_ids == b.token_ids == c.token_ids and a.tool_mask == c.tool_mask


def test_a_call_on_the_first_token_copies_the_shared_prompt_block(model):
    """Samples fork from the prompt and share its last, partly filled block; a sample paused after its first
    token resumes with a private copy of that block, so no sibling's cache is overwritten."""
    engine = Engine(model, TOK, block_size=8, num_blocks=256)
    prompt = TOK.encode("12+3=")  # 5 tokens: the first block is shared and partly filled
    outs, _ = generate_episodes(engine, [prompt], SamplingParams(n=4, max_tokens=16, seed=1, ignore_eos=True),
                                EveryN(1, output="#"), max_tool_calls=5)
    for c in outs[0].completions:
        assert c.tool_mask[1] and len(c.tool_calls) == 5
        lp = full_logprobs(model, prompt + c.token_ids)
        for t, token in enumerate(c.token_ids):
            if not c.tool_mask[t]:
                assert abs(lp[len(prompt) + t - 1, token].item() - c.logprobs[t]) < 1e-4


def test_paused_sequences_survive_a_tiny_pool_with_the_same_tokens(model):
    """A pool too small for every paused sequence: running ones are preempted and paused ones evicted, and
    all are recomputed to the same tokens."""
    prompts = [TOK.encode("12+34="), TOK.encode("99*9="), TOK.encode("1+2=")]
    sp = SamplingParams(n=3, max_tokens=20, seed=2, ignore_eos=True)
    big, _ = generate_episodes(Engine(model, TOK, block_size=4, num_blocks=256), prompts, sp, EveryN(3))
    small_engine = Engine(model, TOK, block_size=4, num_blocks=12)
    small, _ = generate_episodes(small_engine, prompts, sp, EveryN(3))
    assert small_engine.last_stats["preemptions"] > 0
    for a, b in zip(big, small):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]


def test_tool_output_is_cut_to_the_token_budget(model):
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    outs, _ = generate_episodes(engine, [TOK.encode("1=")], SamplingParams(max_tokens=10, seed=0, ignore_eos=True),
                                EveryN(3, output="x" * 50), max_tool_calls=4)
    c = outs[0].completions[0]
    assert len(c.token_ids) == 10 and c.finish_reason == "length"
    assert c.tool_mask == [False] * 3 + [True] * 6 + [False]


def test_calls_past_max_tool_calls_end_the_episode(model):
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    outs, _ = generate_episodes(engine, [TOK.encode("1=")], SamplingParams(max_tokens=60, seed=0, ignore_eos=True),
                                EveryN(2), max_tool_calls=2)
    c = outs[0].completions[0]
    assert len(c.tool_calls) == 2 and c.finish_reason == "stop"
    assert [k for k, _ in c.turns] == ["policy", "tool", "policy", "tool", "policy"] and len(c.turns[-1][1]) == 2


def test_an_engine_that_cannot_pause_is_refused_naming_the_key():
    class NoEpisodes:
        tokenizer = TOK

    with pytest.raises(ValueError, match="`tools`.*rollout.backend: ours"):
        generate_episodes(NoEpisodes(), [[1]], SamplingParams(), EveryN(2))


def test_routing_replay_covers_the_whole_episode(model):
    """Every fed token's experts, tool tokens and resumed prefills included, as a recompute routes them."""
    engine = Engine(model, TOK, block_size=4, num_blocks=256, record_routing=True)
    prompt = TOK.encode("12+34=")
    outs, _ = generate_episodes(engine, [prompt], SamplingParams(n=2, max_tokens=16, seed=0, ignore_eos=True),
                                EveryN(4), max_tool_calls=2)
    for c in outs[0].completions:
        assert sum(c.tool_mask) > 0
        ids = prompt + c.token_ids
        assert c.routed_experts.shape[0] == len(ids) - 1
        model.record_routing(True)
        try:
            with torch.no_grad():
                model(torch.tensor([ids[:-1]]))
            recomputed = model.recorded_routing()[0].to(torch.int16)
        finally:
            model.record_routing(False)
        assert torch.equal(recomputed.sort(-1).values, c.routed_experts.sort(-1).values)


device = devices.device


def test_episodes_on_the_device_default_path_match_a_full_recompute(device):
    """On CUDA the engine's default decode path (CUDA graphs over persistent buffers, the counter sampler);
    tool tokens resumed from the cache, log-probs equal to a recompute of the whole episode."""
    model = build_model(preset_config("micro", vocab_size=len(TOK)), seed=1).eval().to(device)
    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    prompts = [TOK.encode("12+34="), TOK.encode("9*9=")]
    outs, _ = generate_episodes(engine, prompts, SamplingParams(n=3, max_tokens=24, seed=0, ignore_eos=True),
                                EveryN(4), max_tool_calls=3)
    expected, resumes = expected_prefill(prompts, outs)
    assert engine.last_stats["prefill_tokens"] == expected
    for prompt, out in zip(prompts, outs):
        for c in out.completions:
            assert resumes and c.tool_calls
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([prompt + c.token_ids], device=device))[0].float(), -1)
            for t, token in enumerate(c.token_ids):
                if not c.tool_mask[t]:
                    assert abs(lp[len(prompt) + t - 1, token].item() - c.logprobs[t]) < 1e-3


def test_a_running_sequence_that_cannot_grow_takes_a_paused_sequences_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_prefill_tokens=64)
    running, paused = Sequence(list(range(5)), SamplingParams()), Sequence(list(range(12)), SamplingParams())
    blocks.allocate(running, 4)
    running.num_cached = 4  # its fifth token needs a new block
    blocks.allocate(paused, 12)
    paused.num_cached = 11
    scheduler.running.append(running)
    scheduler.resume(paused)  # waiting with its three blocks; the pool is full
    batch, prefill, _ = scheduler.schedule()
    assert batch == [running] and not prefill
    assert paused.block_table == [] and paused.num_cached == 0 and scheduler.num_preemptions == 1


class SlowEveryN(EveryN):
    """EveryN whose calls take 0-60 ms, by the turn's text, so that they come back in another order than
    they were made."""

    def run(self, calls):
        import time

        time.sleep(0.02 * (sum(map(ord, calls[0].arguments)) % 4))
        return super().run(calls)


@pytest.mark.parametrize("decode_path", ["eager", "buffers"])
def test_overlapped_calls_give_the_completions_of_calls_the_batch_waits_for(model, decode_path):
    """With overlap each call runs in the background and its sequence resumes when it is back, the others
    decoding meanwhile: the batches differ, the seeded completions (tokens, log-probs, tool turns, calls, finish
    reasons: "length" inside a tool turn and a call past max_tool_calls among them) do not."""
    prompts = [TOK.encode("12+34="), TOK.encode("9*9="), TOK.encode("100-1=")]
    sp = [SamplingParams(n=3, max_tokens=m, seed=s, ignore_eos=True) for m, s in ((26, 1), (13, 2), (40, 3))]
    runs = {}
    for overlap in (False, True):
        engine = Engine(model, TOK, block_size=4, num_blocks=256, decode_path=decode_path)
        box = SlowEveryN(4, output="[{}..]")
        runs[overlap] = generate_episodes(engine, prompts, sp, box, max_tool_calls=3, overlap=overlap)
        if overlap:
            assert max(box.batches) == 1  # one call at a time, each on its own
    (waited, w_stats), (overlapped, o_stats) = runs[False], runs[True]
    assert w_stats["steps_beside_tools"] == 0 < o_stats["steps_beside_tools"]
    reasons = set()
    for a, b in zip(waited, overlapped):
        for x, y in zip(a.completions, b.completions):
            assert x.token_ids == y.token_ids and x.tool_mask == y.tool_mask and x.finish_reason == y.finish_reason
            assert [c["output"] for c in x.tool_calls] == [c["output"] for c in y.tool_calls]
            torch.testing.assert_close(torch.tensor(y.logprobs), torch.tensor(x.logprobs), atol=1e-5, rtol=0)
            reasons.add((x.finish_reason, len(x.tool_calls)))
    assert ("length", 3) in reasons and ("stop", 3) in reasons  # both endings ran through the overlap path


def test_overlapped_calls_that_fail_or_hang_still_end_every_sequence(model):
    """The real Toolbox under overlap: a call that raises comes back as an error for the policy to read, one
    that hangs as a timeout, and generate returns with every completion."""
    from grpo.tools import Toolbox

    def flaky(x: int = 0):
        if x == 1:
            raise ValueError("no")
        if x == 2:
            import time

            time.sleep(5)
        return x

    class Box(Toolbox):
        def find_call(self, text):
            return ToolCall("flaky", {"x": len(text) % 3}) if len(text) >= 3 else None

    engine = Engine(model, TOK, block_size=4, num_blocks=256)
    outs, stats = generate_episodes(engine, [TOK.encode("1+1=")], SamplingParams(n=6, max_tokens=12, seed=4,
                                                                                 ignore_eos=True),
                                    Box([flaky], timeout_s=0.3, max_workers=2), max_tool_calls=1, overlap=True)
    calls = [c for o in outs for comp in o.completions for c in comp.tool_calls]
    assert len(calls) == 6 and all(comp is not None for comp in outs[0].completions)
    outputs = {c["output"].split(":")[0] for c in calls}
    assert outputs <= {"0", "ValueError", "TimeoutError"} and stats["tool_seconds"] > 0
