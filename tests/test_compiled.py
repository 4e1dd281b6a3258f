"""The compiled paths against the eager ones: the decode step compiled ahead of time (AOTInductor) and
the decoder blocks under torch.compile for training.

Compiling takes tens of seconds per model shape on a cold cache, so these run in the slow CI step."""

import shutil

import pytest
import torch

from grpo.rollout import SamplingParams
from grpo.rollout.engine import Engine
from model import LatentCache, build_model, contiguous_view
from model.presets import preset_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="AOTInductor needs a C++ compiler"),
]

CONFIGS = {
    "v3_q_lora_groups": {},
    # V2-Lite-like: no query LoRA, attention biases, softmax gate with group-limited greedy, two shared experts.
    "v2_no_q_lora_bias_softmax": dict(q_lora_rank=None, attention_bias=True, scoring_func="softmax",
                                      topk_method="group_limited_greedy", n_shared_experts=2,
                                      routed_scaling_factor=16.0, norm_topk_prob=False),
}


def make_model(overrides: dict, seed: int = 5):
    m = build_model(preset_config("micro", vocab_size=61, **overrides), seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5, generator=g)  # nonzero attention biases, so dropping one would show
            elif p.dim() > 1:
                p.mul_(4.0)  # sharper attention and routing than the init
        for moe in m.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.3, generator=g)  # it must reach the compiled gate
    return m


def decode_two_steps(m, batch: int):
    """Prefill 6 tokens, then two one-token decode steps (the last row padding in the first step when
    batch > 1). Returns the decode logits and the cache (in the model's dtype)."""
    g = torch.Generator().manual_seed(2)
    cache = LatentCache(m.config, num_slots=batch * 9, dtype=m.lm_head.weight.dtype)
    out = []
    with torch.no_grad():
        pos = torch.arange(6).expand(batch, 6)
        m(torch.randint(3, 61, (batch, 6), generator=g), positions=pos, cache=contiguous_view(cache, pos, 9))
        for step in range(2):
            pos = torch.full((batch, 1), 6 + step)
            if step == 0 and batch > 1:
                pos[-1] = -1
            logits = m(torch.randint(3, 61, (batch, 1), generator=g), positions=pos.clamp(min=0),
                       cache=contiguous_view(cache, pos, 9), absorb=True)
            out.append(logits[pos[:, 0] >= 0])
    return out, cache.data


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_decode_matches_the_eager_step(name):
    m = make_model(CONFIGS[name])
    for batch in (3, 1):
        eager_logits, eager_cache = decode_two_steps(m, batch)
        m.compile_decode()
        graphs, steps = m.model.compiled_decode, []

        def counted_step(*args, step=graphs.step, steps=steps):
            steps.append(1)
            return step(*args)

        graphs.step = counted_step
        try:
            compiled_logits, compiled_cache = decode_two_steps(m, batch)
        finally:
            m.model.compiled_decode = None
        assert len(steps) == 2  # both decode steps ran compiled
        assert graphs._kernels is not None  # float32 on a CPU: attention and routed experts by our kernels
        for e, c in zip(eager_logits, compiled_logits):
            torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled_cache, eager_cache, atol=1e-5, rtol=1e-5)


def test_compiled_decode_in_bfloat16_computes_as_the_eager_bfloat16_step():
    """A bfloat16 copy of the model (`rollout.dtype: bfloat16`) decodes through bfloat16 graphs and our kernels
    (attention reading the bfloat16 cache, the routed experts in float32 between float32 graph outputs): its
    logits are as close to the float32 model's as the eager bfloat16 step's are, and it writes the cache the
    eager step writes (to bfloat16 rounding)."""
    full = make_model({})
    m = full.inference_copy(torch.bfloat16)
    for batch in (3, 1):
        want, _ = decode_two_steps(full, batch)
        eager_logits, eager_cache = decode_two_steps(m, batch)
        m.compile_decode()
        graphs = m.model.compiled_decode
        try:
            compiled_logits, compiled_cache = decode_two_steps(m, batch)
        finally:
            m.model.compiled_decode = None
        assert graphs._kernels is not None and graphs.reads_pages and graphs.io_dtype == torch.float32
        assert compiled_cache.dtype == torch.bfloat16
        for w, e, c in zip(want, eager_logits, compiled_logits):
            assert c.dtype == torch.bfloat16
            eager_error, compiled_error = (e.float() - w).abs().max(), (c.float() - w).abs().max()
            assert 0 < compiled_error <= 2 * eager_error, (compiled_error, eager_error)
            torch.testing.assert_close(c.float(), e.float(), atol=4 * float(eager_error), rtol=0)
        torch.testing.assert_close(compiled_cache.float(), eager_cache.float(), atol=0.05, rtol=0.02)


def test_compiled_bfloat16_engine_stays_as_close_to_the_trainer_as_the_eager_one():
    """Seeded samples from engines decoding a bfloat16 copy, eager and compiled, scored by the float32 model
    they copy (what the trainer recomputes): the compiled engine's rollout/trainer log-prob mismatch is of
    the eager one's size, small, and neither is zero (the copy really is bfloat16)."""
    m = make_model({}, seed=7)
    prompts = [[1, 5, 9, 13], [1, 7, 7], [1, 30, 31, 32, 33, 34]]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=16, ignore_eos=True, seed=3)
    mismatch = {}
    for compiled in (False, True):
        engine = Engine(m, num_blocks=64, block_size=4, dtype=torch.bfloat16, compile=compiled)
        assert (engine.runner.model.model.compiled_decode is not None) == compiled
        diffs = []
        for prompt, out in zip(prompts, engine.generate(prompts, params)):
            for c in out.completions:
                ids = torch.tensor([prompt + c.token_ids])
                with torch.no_grad():
                    logprobs = m(ids)[0, len(prompt) - 1:-1].log_softmax(-1)
                recomputed = logprobs.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
                diffs.append((recomputed - torch.tensor(c.logprobs)).abs())
        mismatch[compiled] = torch.cat(diffs).mean().item()
    assert m.model.compiled_decode is None  # the float32 model itself was left alone
    assert 0 < mismatch[True] <= 2 * mismatch[False] + 1e-3 and mismatch[True] < 0.05, mismatch


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("H,rank,rope_dim", [(4, 512, 64), (5, 75, 7)])
def test_attention_kernels_read_a_bfloat16_cache_as_its_float32_values(portable, H, rank, rope_dim):
    """Over a bfloat16 cache, both attention kernels give what they give over the same values in float32
    (widening is exact and the arithmetic float32 either way; only the compiler's fused multiply-adds in the
    scalar tails may differ): vLLM's MLA sizes, and sizes that take every vector loop and its tails (four heads
    and one more, rank past 64 and off the vector width); a float16 cache is refused by name."""
    from model.native import decode_kernels

    kernels = decode_kernels(portable=portable)
    g = torch.Generator().manual_seed(11)
    B, R = 4, rank + rope_dim
    q = torch.randn(B, H, R, generator=g)
    context = torch.randn(B, 45, R, generator=g).bfloat16()
    bias = torch.zeros(B, 40)
    bias[1, ::3] = float("-inf")
    torch.testing.assert_close(kernels.latent_attention(q, context, bias, rank, 0.3),
                               kernels.latent_attention(q, context.float(), bias, rank, 0.3), atol=1e-6, rtol=1e-5)
    pool = torch.randn(30 * 4, R, generator=g).bfloat16()
    tables = torch.randperm(30, generator=g)[: B * 7].view(B, 7).to(torch.int32)
    lengths = torch.tensor([1, 4, 17, 27])
    torch.testing.assert_close(kernels.latent_attention_paged(q, pool, tables, lengths, 4, rank, 0.3),
                               kernels.latent_attention_paged(q, pool.float(), tables, lengths, 4, rank, 0.3),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16, not Half"):
        kernels.latent_attention_paged(q, pool.half(), tables, lengths, 4, rank, 0.3)


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("heads,rank,rope_dim,context", [(4, 512, 64, 150), (4, 64, 16, 40), (3, 29, 8, 37),
                                                          (6, 40, 4, 1)])
def test_latent_attention_kernel_equals_pytorchs_attention(heads, rank, rope_dim, context, portable):
    """The single-pass kernel against `LatentDecode.attention`: vLLM's MLA sizes, the tiny model's, and
    sizes off every vector width (odd heads, rank and rope dims, a one-position context), over a context
    buffer longer than the positions attended, with masked positions: a whole leading tile of them in one
    row, scattered ones in another, and a row whose only unmasked position is the last. Both builds: the
    AVX2 one this machine runs and the plain loops other CPUs run."""
    from model.attention import LatentDecode
    from model.native import decode_kernels

    kernel = decode_kernels(portable=portable).latent_attention
    g = torch.Generator().manual_seed(heads * rank + context)
    B, R = 5, rank + rope_dim
    q = torch.randn(B, heads, R, generator=g)
    buffer = torch.randn(B, context + 7, R, generator=g)
    bias = torch.zeros(B, context)
    if context > 1:
        bias[0, : min(20, context - 1)] = float("-inf")
        bias[1, ::3] = float("-inf")
        bias[2, :-1] = float("-inf")
    decode = LatentDecode(heads, 8, rope_dim, rank, softmax_scale=0.3, q_norm_eps=None, kv_norm_eps=1e-6)
    expected = decode.attention(q, buffer[:, :context], bias)
    torch.testing.assert_close(kernel(q, buffer, bias, rank, 0.3), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("heads,rank,rope_dim,block_size", [(4, 512, 64, 16), (4, 64, 16, 4), (3, 29, 8, 32)])
def test_paged_latent_attention_reads_the_pool_through_block_tables(heads, rank, rope_dim, block_size, portable):
    """The paged kernel against the dense one over the same context gathered by hand: blocks scattered
    through the pool in no order, lengths of one position, a whole number of blocks and a part-filled
    last block, block tables padded past a sequence's end; blocks smaller and larger than the kernel's
    16-row tile."""
    from model.native import decode_kernels

    kernels = decode_kernels(portable=portable)
    g = torch.Generator().manual_seed(heads + rank + block_size)
    lengths = torch.tensor([1, 3 * block_size, 2 * block_size + 5, 37, block_size - 1])
    B, width = len(lengths), -(-37 // block_size) + 1  # one block of padding in the longest table
    R, num_blocks = rank + rope_dim, B * width + 3
    pool = torch.randn(num_blocks * block_size, R, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: B * width].view(B, width).to(torch.int32)
    q = torch.randn(B, heads, R, generator=g)
    S = int(lengths.max())
    position = torch.arange(S)
    slots = tables.long().gather(1, (position // block_size).expand(B, S)) * block_size + position % block_size
    context = pool[slots]  # [B, S, R]
    bias = torch.where(position < lengths[:, None], 0.0, float("-inf"))
    expected = kernels.latent_attention(q, context, bias, rank, 0.3)
    got = kernels.latent_attention_paged(q, pool, tables, lengths, block_size, rank, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # tiles split differently: rounding differs
    with pytest.raises(RuntimeError, match="exceeds its block table"):
        kernels.latent_attention_paged(q, pool, tables, lengths.clone().fill_(width * block_size + 1), block_size,
                                       rank, 0.3)
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.latent_attention_paged(q, pool, tables + num_blocks, lengths, block_size, rank, 0.3)


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
@pytest.mark.parametrize("tokens,dim,inter,experts,top_k", [(32, 256, 256, 8, 2), (7, 60, 36, 6, 3), (1, 16, 8, 4, 1)])
def test_routed_experts_kernel_equals_the_experts_module(tokens, dim, inter, experts, top_k, portable):
    """The native routed experts against `Experts.forward` (eager, exact per expert), with experts that
    no token chose and sizes off the vector width; a bad expert id is an error, not a wild read."""
    from model.moe import Experts
    from model.native import decode_kernels

    kernels = decode_kernels(portable=portable)
    g = torch.Generator().manual_seed(tokens + dim)
    module = Experts(experts, dim, inter)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.1, generator=g)
        module.down_proj.normal_(0, 0.1, generator=g)
    x, base = torch.randn(tokens, dim, generator=g), torch.randn(tokens, dim, generator=g)
    # every token picks from the first experts - 1: the last expert gets no rows
    ids = torch.stack([torch.randperm(experts - 1, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    with torch.no_grad():
        expected = base + module(x, weights, ids)
        got = kernels.routed_experts(base, x, weights, ids, *module.packed_weights())
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.routed_experts(base, x, weights, ids + experts, *module.packed_weights())


def test_compiled_decode_falls_back_to_pytorch_when_the_kernels_do_not_build(monkeypatch):
    """A machine whose compiler cannot build our kernels (say, one without OpenMP) still gets the compiled
    graphs, with PyTorch's attention and the padded experts' graph, and a warning that says so."""
    import model.native as native

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'r1_grpo_decode_kernels'\nfatal error: omp.h: No such file")

    monkeypatch.setattr(native, "decode_kernels", broken)
    m = make_model({})
    eager_logits, eager_cache = decode_two_steps(m, 3)
    with pytest.warns(RuntimeWarning, match="did not build.*omp.h.*run in PyTorch"):
        m.compile_decode()
    assert m.model.compiled_decode._kernels is None and not m.model.compiled_decode.reads_pages
    compiled_logits, compiled_cache = decode_two_steps(m, 3)
    for e, c in zip(eager_logits, compiled_logits):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_cache, eager_cache, atol=1e-5, rtol=1e-5)


def test_compiled_engine_matches_eager_engine_and_follows_weight_updates():
    """Greedy generations and the recorded routing agree, before and after an in-place optimizer step
    (the compiled graphs take the weights as inputs, so they see new weights without recompiling)."""
    m = make_model({}, seed=7)
    prompts = [[1, 5, 9, 13], [1, 7, 7], [1, 30, 31, 32, 33, 34]]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True)
    eager = Engine(m, num_blocks=64, block_size=4, record_routing=True)
    compiled = Engine(m, num_blocks=64, block_size=4, record_routing=True, compile=True)
    assert m.model.compiled_decode.reads_pages  # float32 on a CPU: attention reads the pages in place
    opt = torch.optim.AdamW(m.parameters(), lr=5e-2, fused=True)  # the fused kernel moves no version counters
    for round_ in range(2):
        m.model.compiled_decode, graphs = None, m.model.compiled_decode
        want = eager.generate(prompts, params)
        m.model.compiled_decode = graphs
        got = compiled.generate(prompts, params)
        for w, g in zip(want, got):
            for cw, cg in zip(w.completions, g.completions):
                assert cg.token_ids == cw.token_ids, f"round {round_}"
                assert torch.equal(cg.routed_experts, cw.routed_experts)
                torch.testing.assert_close(cg.logprobs, cw.logprobs, atol=1e-4, rtol=1e-4)  # the trainer's bound
        if round_ == 0:
            m.train()
            logits = m(torch.tensor([[1, 5, 9, 13, 17]]))
            logits.logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
            m.eval()


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """Training through torch.compile'd blocks, routed experts included, with a padded batch, a new shape
    (dynamic: no recompile needed for correctness either way), and the feed-forward on real tokens only."""
    eager, compiled = make_model({}, seed=3).train(), make_model({}, seed=3).train().compile_blocks()
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    breaks_before = sum(torch._dynamo.utils.counters["graph_break"].values())
    g = torch.Generator().manual_seed(4)
    for shape, unpad in (((4, 10), False), ((3, 7), False), ((4, 9), True)):
        ids = torch.randint(3, 61, shape, generator=g)
        mask = torch.ones(shape, dtype=torch.long)
        if unpad:  # right padding, the feed-forward on the real tokens only (as the GRPO trainer runs it)
            mask[1, 5:] = mask[3, 2:] = 0
            token_index = mask.flatten().nonzero()[:, 0]
        else:
            mask[0, :3] = 0  # left padding in one row
            token_index = None
        losses = []
        for m in (eager, compiled):
            m.zero_grad()
            if unpad:
                hidden = m.hidden_states(ids, token_index=token_index)
                loss = m.lm_head(m.model.norm(hidden[mask.bool()])).logsumexp(-1).mean()
            else:
                loss = m(ids, attention_mask=mask).logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            if pe.grad is None:
                assert pc.grad is None, name
                continue
            torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # the blocks did run compiled
    # whole: the expert dispatch reads nothing back to the host when training, so nothing breaks the graph
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks_before


def test_compiled_blocks_compile_once_per_block_kind_and_grad_mode(monkeypatch):
    """The trainer's forwards alternate between no_grad (reference and old log-probs) and training, with the
    weights changing in between. What the first step compiles (each block kind, dense and MoE, once per grad
    mode), later steps, of new shapes, reuse: a recompile costs ~10 s on the tiny model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counter, **kw))
    torch._dynamo.reset()
    m = make_model({}, seed=3).compile_blocks()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(4)
    for step, shape in enumerate(((8, 10), (6, 13), (8, 11))):  # over 64 tokens: no small-batch expert path
        ids = torch.randint(3, 61, shape, generator=g)
        with torch.no_grad():
            m.eval()(ids)
        m.train()(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            compiles = counter.frame_count
    assert compiles > 0 and counter.frame_count == compiles
