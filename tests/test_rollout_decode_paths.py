"""The engine's decode paths agree: the CPU's eager step, the step over persistent buffers (sync-free, what a
CUDA graph captures) and, where CUDA exists, the captured graphs themselves."""

import devices
import pytest
import torch

from grpo.rollout import SamplingParams
from grpo.rollout.cuda_graphs import LADDER, padded_size
from grpo.rollout.engine import Engine
from grpo.rollout.model_runner import ModelRunner
from model import build_model
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer

device = devices.device
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34, 35]]


def tiny(dev: str = "cpu", dtype: torch.dtype = torch.float32, vocab: int = 256):
    model = build_model(preset_config("tiny", vocab_size=vocab), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)  # sharper distributions: greedy choices far from float ties
    return model.to(dev, dtype).eval()


def run(model, path: str, params: SamplingParams, **kw):
    out = Engine(model, block_size=16, num_blocks=64, decode_path=path, **kw).generate(PROMPTS, params)
    return [c for o in out for c in o.completions]


@pytest.mark.parametrize("sampler", ["generator", "counter"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(n=5, temperature=1.0, top_k=50, max_tokens=40, ignore_eos=True, seed=3),  # 20 rows: padded to 24
    SamplingParams(n=5, temperature=0.8, max_tokens=40, ignore_eos=True, seed=4),  # counter: sampled in the step
], ids=["greedy", "top_k", "unfiltered"])
def test_buffered_decode_equals_the_eager_path(params, sampler):
    """The buffered step computes the eager step's logits; with the counter sampler and no filter it also
    samples on the device (`ModelRunner.decode_tokens`), drawing what the eager sampler draws."""
    model = tiny()
    eager = run(model, "eager", params, sampler=sampler)
    buffered = run(model, "buffers", params, sampler=sampler)
    assert [c.token_ids for c in buffered] == [c.token_ids for c in eager]
    for a, b in zip(eager, buffered):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_buffered_decode_records_the_same_routing():
    model = tiny()
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, ignore_eos=True, seed=0)
    eager = run(model, "eager", params, record_routing=True)
    buffered = run(model, "buffers", params, record_routing=True)
    for a, b in zip(eager, buffered):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.routed_experts, b.routed_experts)


def test_the_persistent_decode_batch_gives_the_step_what_a_full_rewrite_gives(monkeypatch):
    """`DecodeBatch` advances the last step's rows when the batch is the same sequences or some of them (gathered
    to the front), and the step copies the block tables and temperatures only when they changed; at every step
    of a run with copies on write, preemptions, sequences ending at EOS and others admitted, the device buffers
    the step reads hold what writing the batch from scratch gives."""
    from types import SimpleNamespace

    import numpy as np

    from grpo.rollout.cuda_graphs import DecodeGraphs
    from grpo.rollout.decode_batch import DecodeBatch

    seen = {"steps": 0, "advanced": 0, "gathered": 0, "copies_skipped": 0}
    write, run_step = DecodeBatch.write, DecodeGraphs.run

    def checked_write(self, seqs, sampled, chained=False):
        assert not chained  # this engine steps one by one
        seen["advanced"] += self.seqs == seqs and self.sampled == sampled
        seen["gathered"] += 0 < len(seqs) < len(self.seqs) and {id(s) for s in seqs} <= {id(s) for s in self.seqs}
        fresh = SimpleNamespace(host_rows=np.zeros_like(self.rows), host_table_rows=np.zeros_like(self.tables),
                                host_temperature_row=np.zeros_like(self.temperature))
        seen["fresh"] = (fresh, write(DecodeBatch(fresh, self.block_size), seqs, sampled)[0])
        return write(self, seqs, sampled, chained)

    def checked_run(self, batch, width, sampled, tables=True, temperature=True, after=None):
        out = run_step(self, batch, width, sampled, tables, temperature, after)
        fresh, fresh_width = seen["fresh"]
        assert width == fresh_width
        rows = 7 if sampled else 4
        assert np.array_equal(self.inputs[:rows, :batch].numpy(), fresh.host_rows[:rows, :batch])
        assert np.array_equal(self.tables[:batch, :width].numpy(), fresh.host_table_rows[:batch, :width])
        assert not sampled or np.array_equal(self.temperature[:batch].numpy(), fresh.host_temperature_row[:batch])
        seen["steps"] += 1
        seen["copies_skipped"] += not tables
        return out

    monkeypatch.setattr(DecodeBatch, "write", checked_write)
    monkeypatch.setattr(DecodeGraphs, "run", checked_run)
    params = [SamplingParams(n=4, temperature=0.8, max_tokens=40, seed=1),  # ends at EOS now and then
              SamplingParams(n=3, temperature=0, max_tokens=23, ignore_eos=True)]
    engine = Engine(tiny(), block_size=4, num_blocks=40, decode_path="buffers", sampler="counter", max_num_seqs=12)
    outs = engine.generate(PROMPTS[:2] * 2, params * 2)
    assert engine.last_stats["preemptions"] > 0 and "stop" in {c.finish_reason for o in outs for c in o.completions}
    assert 0 < seen["copies_skipped"] < seen["advanced"] < seen["steps"] and seen["gathered"] > 0


TOK = build_char_tokenizer()
OVERLAP_CASES = {
    "uniform": ([SamplingParams(n=5, temperature=0.8, max_tokens=40, ignore_eos=True, seed=4)], {}),
    # Sequences end at EOS and stop tokens (found one step late) and at four different lengths (one token:
    # left out of the step after its first), and a greedy request rides along.
    "stops_and_lengths": ([SamplingParams(n=4, temperature=1.0, max_tokens=m, seed=7, stop_token_ids=[20, 30, 40])
                           for m in (30, 5, 17, 1)] + [SamplingParams(temperature=0, max_tokens=12)], {}),
    "stop_strings": ([SamplingParams(n=3, temperature=1.0, max_tokens=32, seed=9,
                                     stop=[TOK.decode([50]), TOK.decode([60, 61])])] * 4, {}),
    # Fewer seats than sequences (they wait for one to end) and a pool that runs dry (preemptions): the steps
    # that admit or preempt wait for the tokens of the step in flight.
    "waiting_and_preempted": ([SamplingParams(n=4, temperature=0.9, max_tokens=40, seed=3)],
                              {"max_num_seqs": 10, "block_size": 4, "num_blocks": 36}),
}


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_overlapped_decode_gives_the_step_by_step_completions(case, device, monkeypatch):
    """Engine(overlap=True) launches each decode step before reading the one before it (its input tokens taken
    on the device); the completions, their finish reasons and log-probs are those of the step-by-step engine,
    whatever ends the sequences. On a CPU the buffered path runs the same bookkeeping (nothing runs
    asynchronously there); on CUDA the captured graphs with their read-back in flight."""
    from grpo.rollout.model_runner import ModelRunner as Runner

    params, options = OVERLAP_CASES[case]
    params = params * len(PROMPTS) if len(params) == 1 else params
    prompts = (PROMPTS * 2)[: len(params)]  # the fifth is the first again: one prefill shared
    path = "graphs" if device == "cuda" else "buffers"
    model = tiny(device, vocab=len(TOK))
    kw = {"block_size": 16, "num_blocks": 64, **options}
    seen = {"chained": 0, "dead_rows": 0}
    launch, collect = Runner.launch_decode, Engine._collect

    def counted_launch(self, seqs, after=None):
        seen["chained"] += after is not None
        return launch(self, seqs, after)

    def counted_collect(self, pending, *args):
        seen["dead_rows"] += sum(s.status.value == "finished" for s in pending.seqs)
        return collect(self, pending, *args)

    stepwise_engine = Engine(model, TOK, decode_path=path, sampler="counter", **kw)
    stepwise = [c for o in stepwise_engine.generate(prompts, params) for c in o.completions]
    monkeypatch.setattr(Runner, "launch_decode", counted_launch)
    monkeypatch.setattr(Engine, "_collect", counted_collect)
    overlapped_engine = Engine(model, TOK, decode_path=path, sampler="counter", overlap=True, **kw)
    overlapped = [c for o in overlapped_engine.generate(prompts, params) for c in o.completions]
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in stepwise]
    assert [c.finish_reason for c in overlapped] == [c.finish_reason for c in stepwise]
    assert [c.text for c in overlapped] == [c.text for c in stepwise]
    for a, b in zip(stepwise, overlapped):
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < 1e-4
    # Most steps ran ahead; where sequences wait for seats or are preempted, those steps wait for the tokens.
    assert seen["chained"] > (0.2 if case == "waiting_and_preempted" else 0.6) * stepwise_engine.last_stats["steps"]
    reasons = {c.finish_reason for c in stepwise}
    if "stop" in reasons:  # a sequence ended by a token found one step late ran a step for nothing
        assert seen["dead_rows"] > 0
    if case == "waiting_and_preempted":
        assert overlapped_engine.last_stats["preemptions"] > 0 and stepwise_engine.last_stats["preemptions"] > 0
        assert reasons == {"stop", "length"}


def test_overlap_needs_the_counter_sampler_on_a_buffered_path_and_steps_one_by_one_where_it_cannot_run_ahead(
        monkeypatch):
    with pytest.raises(ValueError, match="overlap=True.*sampler='counter'.*decode_path 'buffers' or 'graphs'"):
        Engine(tiny(), overlap=True)  # the CPU defaults: the generator sampler, the eager path
    with pytest.raises(ValueError, match="got sampler='generator'"):
        Engine(tiny(), overlap=True, decode_path="buffers", sampler="generator")
    from grpo.rollout.model_runner import ModelRunner as Runner

    chained = []
    launch = Runner.launch_decode
    monkeypatch.setattr(Runner, "launch_decode", lambda self, seqs, after=None: (chained.append(after is not None),
                                                                                 launch(self, seqs, after))[1])
    engine = Engine(tiny(), block_size=16, num_blocks=64, decode_path="buffers", sampler="counter", overlap=True)
    filtered = SamplingParams(n=2, temperature=1.0, top_k=20, max_tokens=8, ignore_eos=True, seed=1)
    engine.generate(PROMPTS, filtered)  # top-k samples from the logits on the host: no step runs ahead
    assert not any(chained)
    with pytest.raises(RuntimeError, match="cannot record routing"):
        engine.runner.record_routing = True
        engine.runner.launch_decode([], after=object())  # type: ignore[arg-type]


def test_the_graph_a_batch_replays_is_found_by_its_padded_size():
    runner = ModelRunner(tiny(), 8, 16, decode_path="buffers")
    graphs = runner.decode_graphs
    assert graphs.captured(5) is None
    graphs.graphs[(6, False)] = ("logits graph", None)
    assert graphs.captured(5) == ("logits graph", False)
    graphs.graphs[(6, True)] = ("sampling graph", None)
    assert graphs.captured(6) == ("sampling graph", True)  # the step with its sampler, as the engine runs it
    assert graphs.captured(7) is None


def test_padded_sizes_and_refusals():
    assert [padded_size(b) for b in (1, 5, 13, 128, 129, 1025)] == [1, 6, 16, 128, 192, 1280]
    assert all(padded_size(s) == s for s in LADDER)
    with pytest.raises(ValueError, match="decode_path='graphs' captures CUDA graphs"):
        ModelRunner(tiny(), 8, 16, decode_path="graphs")
    with pytest.raises(ValueError, match="allowed are 'eager', 'buffers', 'graphs'"):
        ModelRunner(tiny(), 8, 16, decode_path="fast")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Engine(tiny(), gpu_memory_utilization=0.5)


def test_cuda_graphs_give_the_eager_tokens(device):
    """On CUDA: the captured step replays what the uncaptured one computes (greedy tokens equal), and the graphs
    are kept across an optimizer step, whose new weights they replay (the derived ones remade in place)."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a CUDA device (the buffered path above runs the same step on the CPU)")
    model = tiny(device)
    sampled = SamplingParams(n=3, temperature=1.0, max_tokens=32, ignore_eos=True, seed=5)
    assert [c.token_ids for c in run(model, "graphs", sampled)] == [c.token_ids for c in run(model, "buffers", sampled)]
    params = SamplingParams(n=3, temperature=0, max_tokens=32, ignore_eos=True)
    engine = Engine(model, block_size=16, num_blocks=64, decode_path="graphs")
    graphed = [c for o in engine.generate(PROMPTS, params) for c in o.completions]
    buffered = run(model, "buffers", params)
    assert [c.token_ids for c in graphed] == [c.token_ids for c in buffered]
    captured = engine.runner.decode_graphs.captures
    assert captured >= 1
    engine.generate(PROMPTS, params)
    assert engine.runner.decode_graphs.captures == captured  # same weights: the graphs are replayed
    # An optimizer step in place, as fused AdamW makes it (no version counter moves), on a weight the graph
    # reads directly and on one it reads through a derived copy (MLA's absorbed projections).
    model.lm_head.weight.data.mul_(1.5)
    model.model.layers[0].self_attn.kv_b_proj.weight.data.mul_(-1.0)
    again = [c for o in engine.generate(PROMPTS, params) for c in o.completions]
    assert engine.runner.decode_graphs.captures == captured  # the same addresses: the graphs are kept
    assert [c.token_ids for c in again] == [c.token_ids for c in run(model, "buffers", params)]
    assert [c.token_ids for c in again] != [c.token_ids for c in graphed]


def test_the_cuda_decode_runs_the_triton_kernels(device, monkeypatch):
    """On CUDA the decode step's attention and routed experts go through model.kernels' Triton path."""
    if device != "cuda":
        pytest.skip("the Triton path is chosen on CUDA only")
    from model import kernels
    from model.kernels import decode_attention, moe

    calls = {"attention": 0, "gemm": 0}
    attn, gemm = decode_attention.paged_latent_attention, moe.grouped_gemm
    monkeypatch.setattr(decode_attention, "paged_latent_attention",
                        lambda *a, **k: (calls.__setitem__("attention", calls["attention"] + 1), attn(*a, **k))[1])
    monkeypatch.setattr(moe, "grouped_gemm",
                        lambda *a, **k: (calls.__setitem__("gemm", calls["gemm"] + 1), gemm(*a, **k))[1])
    assert kernels.select_impl(torch.device("cuda"), torch.bfloat16) == "triton"
    run(tiny(device, torch.bfloat16), "buffers", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert calls["attention"] > 0 and calls["gemm"] > 0


def test_a_bfloat16_engine_over_a_float32_model_decodes_a_copy_refreshed_after_each_step():
    """Engine(dtype=bfloat16) over the trainer's float32 model: its own bf16 copy (routing bias float32),
    whose greedy tokens follow the model's; an optimizer step reaches it at the next generate, no earlier."""
    model = tiny()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = Engine(model, block_size=16, num_blocks=64, dtype=torch.bfloat16)
    assert engine.decodes_a_copy and engine.model is not model
    assert engine.model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.float32
    bias = [m.gate.e_score_correction_bias for m in engine.model.moe_layers()]
    assert all(b is None or b.dtype == torch.float32 for b in bias)
    first = [c.token_ids for o in engine.generate(PROMPTS, params) for c in o.completions]
    cast = tiny(dtype=torch.bfloat16)  # the same weights, cast whole: what the copy must compute
    cast_tokens = [c.token_ids for c in run(cast, "eager", params)]
    assert first == cast_tokens
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.tensor([PROMPTS[1]]))[..., :5].sum()
    loss.backward()
    opt.step()  # moves the float32 weights in place
    with torch.no_grad():
        expected = model.lm_head.weight.to(torch.bfloat16)
    assert not torch.equal(engine.model.lm_head.weight, expected)  # not yet: refreshed at the next generate
    engine.generate(PROMPTS, params)
    assert torch.equal(engine.model.lm_head.weight, expected)
