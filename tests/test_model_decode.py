"""The weight-absorbed decode path over the latent cache against the expanded full-sequence forward."""

import pytest
import torch

from model import LatentCache, build_model, contiguous_view
from model.presets import preset_config


@pytest.fixture(scope="module")
def model():
    m = build_model(preset_config("micro", vocab_size=61, rope_interleave=True), seed=4).eval()
    with torch.no_grad():  # larger weights than the init so attention patterns are not flat
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(6.0)
    return m


def test_absorbed_decode_matches_expanded_forward_for_ragged_batch(model):
    lengths = [5, 17, 11]
    max_len = max(lengths)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 61, (n,), generator=g) for n in lengths]
    cache = LatentCache(model.config, num_slots=len(seqs) * max_len)
    with torch.no_grad():
        expected = [model(s[None])[0] for s in seqs]  # expanded path, one full sequence at a time
        # Decode one token per step; a sequence that has ended sends padding (position -1).
        got = [[] for _ in seqs]
        for t in range(max_len):
            ids = torch.tensor([[s[t] if t < len(s) else 0] for s in seqs])
            positions = torch.tensor([[t if t < len(s) else -1] for s in seqs])
            view = contiguous_view(cache, positions, max_len)
            logits = model(ids, positions=positions.clamp(min=0), cache=view, absorb=True)
            for b, s in enumerate(seqs):
                if t < len(s):
                    got[b].append(logits[b, 0])
    assert expected[0].std() > 0.5
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.stack(got[b]), expected[b], atol=1e-4, rtol=0)


def test_expanded_prefill_then_absorbed_decode_matches_full_forward(model):
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, 61, (2, 14), generator=g)
    prompt_len, max_len = 9, 14
    cache = LatentCache(model.config, num_slots=2 * max_len)
    with torch.no_grad():
        expected = model(seq)
        pos = torch.arange(prompt_len).expand(2, -1)
        first = model(seq[:, :prompt_len], positions=pos, cache=contiguous_view(cache, pos, max_len))
        steps = [first]
        for t in range(prompt_len, max_len):
            pos = torch.full((2, 1), t)
            steps.append(model(seq[:, t:t + 1], positions=pos, cache=contiguous_view(cache, pos, max_len), absorb=True))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_absorbed_and_expanded_paths_agree_on_a_multi_token_chunk(model):
    seq = torch.randint(3, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        results = []
        for absorb in (False, True):
            cache = LatentCache(model.config, num_slots=12)
            pos = torch.arange(12)[None]
            results.append(model(seq, positions=pos, cache=contiguous_view(cache, pos, 12), absorb=absorb))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=0)


def test_cache_holds_only_latent_and_rope_key_per_token_and_layer(model):
    cfg = model.config
    cache = LatentCache(cfg, num_slots=10)
    assert cache.values_per_token_per_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cache.data.shape == (cfg.num_hidden_layers, 10, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert cache.bytes_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    # A prefill writes exactly one slot per real token in every layer, and nothing for padding.
    pos = torch.tensor([[0, 1, 2, -1]])
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 0]]), positions=pos.clamp(min=0), cache=contiguous_view(cache, pos, 10))
    written = cache.data.abs().sum(-1) > 0  # [L, slots]
    assert written[:, :3].all() and not written[:, 3:].any()


def test_absorbed_weights_are_derived_once_per_weight_version(model):
    attn = model.model.layers[0].self_attn
    w_uk, _ = attn.absorbed_weights()
    before = w_uk.clone()
    assert attn.absorbed_weights()[0] is w_uk  # same weights: no re-derivation
    with torch.no_grad():
        attn.kv_b_proj.weight.add_(0.01)  # what an optimizer step does, in place
    w_uk2, _ = attn.absorbed_weights()
    assert w_uk2 is w_uk  # remade in place: the same tensor (a captured CUDA graph reads it), new values
    torch.testing.assert_close(w_uk2, before + 0.01)
    attn.kv_b_proj.weight.data.sub_(0.01)  # no version bump, as fused AdamW: only a refresh sees it
    torch.testing.assert_close(attn.absorbed_weights()[0], before + 0.01)  # stale: the version did not move
    model.refresh_derived_weights()
    assert attn.absorbed_weights()[0] is w_uk
    torch.testing.assert_close(w_uk, before)


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "attention_bias": True}],
                         ids=["q_lora", "no_q_lora_with_bias"])
def test_fused_decode_step_matches_the_general_absorbed_forward(overrides):
    """A no-grad one-token step takes Block.decode (fused projections, a mask bias); with grad enabled the
    same call takes the modules' general path. Both must give the same logits and cache."""
    m = build_model(preset_config("micro", vocab_size=61, **overrides), seed=5).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # nonzero attention biases, so dropping one would show
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 61, (3, 6), generator=g)
    results = []
    for grad in (False, True):
        cache = LatentCache(m.config, num_slots=3 * 8)
        with torch.set_grad_enabled(grad):
            pos = torch.arange(6).expand(3, 6)
            m(prompt, positions=pos, cache=contiguous_view(cache, pos, 8))
            pos = torch.tensor([[6], [6], [-1]])  # the last row is padding this step
            logits = m(torch.tensor([[7], [9], [0]]), positions=pos.clamp(min=0),
                       cache=contiguous_view(cache, pos, 8), absorb=True)
        results.append((logits[:2].detach(), cache.data.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=0)


def test_fused_decode_projection_follows_weight_updates(model):
    attn = model.model.layers[0].self_attn
    w, _ = attn.down_weights()
    assert attn.down_weights()[0] is w
    with torch.no_grad():
        attn.kv_a_proj_with_mqa.weight.add_(0.01)
    w2, _ = attn.down_weights()
    torch.testing.assert_close(w2[-attn.kv_a_proj_with_mqa.weight.shape[0]:], attn.kv_a_proj_with_mqa.weight)
    with torch.no_grad():
        attn.kv_a_proj_with_mqa.weight.sub_(0.01)


def test_paged_view_reads_the_context_its_block_tables_name(model):
    """A `PagedCacheView` (what the compiled step's paged kernel reads in place) gives any other reader the
    same context as a view listing the slots: blocks in table order, positions past a sequence's end
    masked out, so the eager decode over it equals the decode over explicit slots."""
    from model.cache import CacheView, PagedCacheView

    bs, g = 4, torch.Generator().manual_seed(3)
    cache = LatentCache(model.config, num_slots=12 * bs)
    cache.data.normal_(generator=g)
    tables = torch.tensor([[7, 2, 9], [4, 0, 0]], dtype=torch.int32)  # the second row padded with block 0
    lengths = torch.tensor([10, 3])
    S = int(lengths.max())
    write = torch.tensor([[9 * bs + 1], [4 * bs + 2]])  # each sequence's last position
    paged = PagedCacheView(cache, write, None, block_tables=tables, lengths=lengths, block_size=bs, max_length=S)
    slots = torch.tensor([[7 * bs + i for i in range(4)] + [2 * bs + i for i in range(4)] + [9 * bs, 9 * bs + 1],
                          [4 * bs, 4 * bs + 1, 4 * bs + 2] + [0] * 7])
    listed = CacheView(cache, write, slots)
    assert paged.context_len == listed.context_len == S
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(paged.read(layer)[0], listed.read(layer)[0])
        torch.testing.assert_close(paged.read(layer)[1, :3], listed.read(layer)[1, :3])
    ids, positions = torch.tensor([[5], [6]]), (lengths - 1)[:, None]
    with torch.no_grad():
        want = model(ids, positions=positions, cache=listed, absorb=True)
        got = model(ids, positions=positions, cache=paged, absorb=True)
    torch.testing.assert_close(got, want)


def test_compile_decode_without_a_cpp_compiler_says_what_to_do(model, monkeypatch):
    import model.transformer as transformer

    monkeypatch.setattr(transformer.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*rollout.compile: false"):
        model.compile_decode()
    assert model.model.compiled_decode is None
