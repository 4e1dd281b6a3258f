"""Config reading and validation, MoE routing and balancing, MTP, gradients, the built-in tokenizer."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from model import ConfigError, ModelConfig, build_model
from model.moe import Experts, Gate, grouped_mm
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer, load_tokenizer

# The published DeepSeek-V3 config.json, less the fields that do not change the math.
DEEPSEEK_V3_CONFIG = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc",
    "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "num_nextn_predict_layers": 1, "max_position_embeddings": 163840,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "hidden_act": "silu",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
DEEPSEEK_V2_LITE_CONFIG = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "n_shared_experts": 2,
    "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax", "routed_scaling_factor": 1.0,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_reads_the_published_v3_and_v2_lite_configs():
    v3 = ModelConfig.from_hf_dict(DEEPSEEK_V3_CONFIG)
    assert v3.rope_scaling.factor == 40 and v3.latent_dim == 576 and v3.is_moe_layer(3) and not v3.is_moe_layer(2)
    assert v3.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    lite = ModelConfig.from_hf_dict(DEEPSEEK_V2_LITE_CONFIG)
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and lite.topk_method == "greedy"


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"scoring_func": "relu"}, "scoring_func 'relu'"),
    ({"n_group": 3}, "divisible by n_group=3"),
    ({"topk_group": 9}, "topk_group=9"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok=300"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim must be even"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling type 'dynamic'"),
    ({"topk_method": "greedy"}, "only 'noaux_tc' is defined for V3"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unknown_or_contradictory_values_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict({**DEEPSEEK_V3_CONFIG, **change})


def test_config_json_round_trips(tmp_path):
    cfg = ModelConfig.from_hf_dict(DEEPSEEK_V3_CONFIG)
    cfg.save(tmp_path)
    again = ModelConfig.from_json(tmp_path)
    assert again == cfg
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["topk_method"] == "noaux_tc" and written["scoring_func"] == "sigmoid"


# ----- MoE ----------------------------------------------------------------------------------------
def micro(**kw):
    return preset_config("micro", vocab_size=40, **kw)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per_expert_loop"])
def test_expert_dispatch_equals_a_per_token_loop(grouped, monkeypatch):
    monkeypatch.setattr(Experts, "_grouped_mm_fits", lambda self, x: grouped)
    g = torch.Generator().manual_seed(0)
    experts = Experts(6, 16, 8)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(6, 16, 16, generator=g))
        experts.down_proj.copy_(torch.randn(6, 16, 8, generator=g))
    x = torch.randn(11, 16, generator=g)
    ids = torch.randint(0, 3, (11, 2), generator=g)  # experts 3..5 are never hit
    ids[:, 1] = (ids[:, 0] + 1) % 6
    w = torch.rand(11, 2, generator=g)
    expected = torch.zeros_like(x)
    for n in range(11):
        for k in range(2):
            gate, up = (experts.gate_up_proj[ids[n, k]] @ x[n]).chunk(2)
            expected[n] += w[n, k] * (experts.down_proj[ids[n, k]] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(experts(x, w, ids), expected, atol=1e-5, rtol=1e-5)


def test_correction_bias_chooses_experts_but_does_not_weigh_them():
    gate = Gate(micro(n_group=1, topk_group=1))
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(5, 64)
    _, _, scores = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias[7] = 100.0  # expert 7 now always chosen
    w1, ids1, _ = gate(x)
    assert (ids1 == 7).any(dim=1).all()
    k7 = (ids1 == 7).float().argmax(dim=1)
    raw = scores.gather(1, ids1)
    expected = raw / raw.sum(-1, keepdim=True) * gate.routing.route_scale
    torch.testing.assert_close(w1, expected)
    assert w1.gather(1, k7[:, None]).max() < gate.routing.route_scale  # weight from the unbiased score, not 100


def test_group_limited_routing_picks_only_from_the_best_groups():
    gate = Gate(micro(n_group=4, topk_group=2))
    with torch.no_grad():
        gate.weight.normal_()
    _, ids, scores = gate(torch.randn(32, 64))
    groups = scores.view(32, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # [N, 2]
    chosen_groups = ids // 2
    assert all(set(chosen_groups[n].tolist()) <= set(groups[n].tolist()) for n in range(32))


def test_aux_loss_free_update_moves_bias_by_the_sign_of_load_error():
    model = build_model(micro())
    model.set_moe_balancing(track_load=True)
    moe = model.moe_layers()[0]
    with torch.no_grad():
        model(torch.randint(0, 40, (4, 16)))
    load = moe.expert_load.clone()
    assert load.sum() == 4 * 16 * 2
    model.update_router_bias(speed=0.001)
    expected = 0.001 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert moe.expert_load.sum() == 0
    assert "e_score_correction_bias" not in {n.split(".")[-1] for n, _ in model.named_parameters()}


def test_sequence_balance_loss_matches_its_definition():
    model = build_model(micro(num_hidden_layers=2))
    model.set_moe_balancing(seq_aux_alpha=0.01)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 5, 64)
    moe(x)
    _, ids, scores = moe.gate(x.view(-1, 64))
    E, K, T = 8, 2, 5
    expected = 0.0
    for b in range(2):
        s = scores.view(2, T, E)[b]
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.bincount(ids.view(2, T * K)[b], minlength=E).float() * E / (K * T)
        expected += 0.01 * (f * P).sum() / 2
    torch.testing.assert_close(moe.aux_loss, expected)
    assert model.balance_loss().requires_grad


# ----- gradients and MTP -----------------------------------------------------------------------------
def test_gradients_reach_every_trainable_parameter_including_mtp():
    model = build_model(micro(num_nextn_predict_layers=1, q_lora_rank=None), seed=1)
    model.set_moe_balancing(seq_aux_alpha=0.01)
    ids = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))
    hidden = model.hidden_states(ids)
    logits = model.lm_head(model.model.norm(hidden))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    (loss + 0.3 * model.mtp_loss(hidden, ids) + model.balance_loss()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    assert all(not b.requires_grad for n, b in model.named_buffers())


def test_mtp_loss_respects_the_loss_mask():
    model = build_model(micro(num_nextn_predict_layers=2), seed=2)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = model.hidden_states(ids)
    depth_logits = model.mtp_logits(hidden, ids)
    assert [tuple(lg.shape) for lg in depth_logits] == [(2, 11, 40), (2, 10, 40)]
    mask = torch.zeros_like(ids)
    mask[:, 8:] = 1
    lg1 = depth_logits[0][:, :-1]  # depth 1: position i predicts token i + 2
    ce1 = torch.nn.functional.cross_entropy(lg1.reshape(-1, 40), ids[:, 2:].reshape(-1), reduction="none").view(2, 10)
    lg2 = depth_logits[1][:, :-1]
    ce2 = torch.nn.functional.cross_entropy(lg2.reshape(-1, 40), ids[:, 3:].reshape(-1), reduction="none").view(2, 9)
    expected = (ce1[:, 6:].mean() + ce2[:, 5:].mean()) / 2
    torch.testing.assert_close(model.mtp_loss(hidden, ids, mask), expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = build_model(micro(), seed=3).train()
        model.model.gradient_checkpointing = ckpt
        model(torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))).sum().backward()
        grads.append(model.model.layers[1].self_attn.kv_b_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ----- tokenizer ----------------------------------------------------------------------------------------
def test_char_tokenizer_saves_in_hf_format_and_keeps_tags_whole(tmp_path):
    tok = build_char_tokenizer()
    text = "<think>12+30=42</think><answer>42</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 4 + len("12+30=42") + len("42")
    tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded(text, add_special_tokens=False).input_ids == ids
        assert loaded.decode(ids) == text
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        prompt = loaded.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
        assert prompt == "<bos>User: 1+1?\nAssistant:"


def test_missing_tokenizer_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def random_experts(g: torch.Generator) -> Experts:
    """8 experts, 16 wide, intermediate 8, with random weights."""
    experts = Experts(8, 16, 8)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(8, 16, 16, generator=g) * 0.3)
        experts.down_proj.copy_(torch.randn(8, 16, 8, generator=g) * 0.3)
    return experts


def test_padded_expert_path_for_decode_batches_equals_the_grouped_path():
    g = torch.Generator().manual_seed(1)
    experts = random_experts(g)
    x = torch.randn(12, 16, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(12)])
    w = torch.rand(12, 2, generator=g)
    with torch.no_grad():
        padded = experts(x, w, ids)  # no grad and few tokens: the padded path
    grouped = experts(x, w, ids)  # grad enabled: the grouped matmuls
    torch.testing.assert_close(padded, grouped.detach(), atol=1e-5, rtol=1e-5)


def test_grouped_and_looped_expert_paths_give_the_same_gradients(monkeypatch):
    g = torch.Generator().manual_seed(2)
    experts = random_experts(g)
    x0 = torch.randn(40, 16, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(40)])  # experts 6, 7 get no token
    w = torch.rand(40, 2, generator=g)
    assert experts._grouped_mm_fits(x0)  # float32, rows of 16 floats: the grouped path serves this
    grads = []
    for grouped in (True, False):
        monkeypatch.setattr(Experts, "_grouped_mm_fits", lambda self, x, grouped=grouped: grouped)
        experts.zero_grad()
        x = x0.clone().requires_grad_()
        experts(x, w, ids).square().sum().backward()
        grads.append((x.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][1][6:].abs().max() == 0  # experts no token chose get a zero gradient


@pytest.mark.parametrize("transpose_w", [True, False])
def test_grouped_mm_op_is_registered_whole_for_torch_compile(transpose_w):
    """Our grouped-matmul op: its fake (shape) rule, its autograd formula and its schema, as torch.library
    checks them, and its values against a per-expert loop (an expert with no rows included)."""
    g = torch.Generator().manual_seed(5)
    ends = torch.tensor([3, 3, 10, 12], dtype=torch.int32)  # expert 1 has no rows
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 12, 8, generator=g) if transpose_w else torch.randn(4, 8, 12, generator=g)
    w.requires_grad_()
    torch.library.opcheck(grouped_mm, (x, w, ends, transpose_w))
    out = grouped_mm(x, w, ends, transpose_w)
    starts = [0, 3, 3, 10]
    for e, (a, b) in enumerate(zip(starts, ends.tolist())):
        w_e = w[e].t() if transpose_w else w[e]
        torch.testing.assert_close(out[a:b], x[a:b] @ w_e)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_as_a_matrix_equals_the_elementwise_rotation(interleaved):
    from model.rope import apply_rope, rope_matrices

    g = torch.Generator().manual_seed(0)
    angles = torch.rand(5, 8, generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(5, 3, 16, generator=g)  # [N, heads, dr]
    expected = apply_rope(x[:, None], cos[:, None], sin[:, None], interleaved)[:, 0]
    torch.testing.assert_close(torch.bmm(x, rope_matrices(cos, sin, interleaved)), expected, atol=1e-6, rtol=0)


def test_feed_forward_on_the_real_tokens_only_gives_the_same_outputs_and_gradients():
    """token_index: the feed-forward layers skip the right padding; the real tokens' hidden states and every
    gradient of a loss over them are those of the whole padded batch, routing replay included."""
    torch.manual_seed(0)
    m = build_model(preset_config("micro", vocab_size=61), seed=4).train()
    lengths = [9, 4, 7]
    B, T = len(lengths), max(lengths)
    ids = torch.randint(3, 61, (B, T))
    real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # [B, T]
    token_index = real.flatten().nonzero()[:, 0]
    M, K = len(m.moe_layers()), m.config.num_experts_per_tok
    routing = torch.stack([torch.randperm(8)[:K] for _ in range(B * T * M)]).view(B, T, M, K)
    for replay in (None, routing):
        outs, grads = [], []
        for index in (None, token_index):
            m.zero_grad()
            hidden = m.hidden_states(ids, routing=replay, token_index=index)
            (hidden[real].square().mean()).backward()
            outs.append(hidden[real].detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
        assert grads[1].keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
