"""Checkpoint I/O: sharding, FP8 dequantization, MTP layers, and refusal of checkpoints that do not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, build_model, load_pretrained
from model.presets import preset_config


def tiny(**kw):
    return build_model(preset_config("micro", vocab_size=53, **kw), seed=7).eval()


def same_logits(a, b):
    ids = torch.randint(0, 53, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)


def test_save_writes_per_expert_keys_named_as_transformers(tmp_path):
    tiny().save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer
    assert not any("gate_up" in k for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["topk_method"] == "noaux_tc" and cfg["scoring_func"] == "sigmoid"


def test_sharded_checkpoint_round_trips_through_its_index(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / f).exists() for f in files)
    same_logits(load_pretrained(tmp_path), model)


def test_bfloat16_load_keeps_routing_bias_in_float32(tmp_path):
    tiny().save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def quantize_fp8(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = w.shape
    bm, bn = -(-M // block), -(-N // block)
    scale = torch.zeros(bm, bn)
    for i in range(bm):
        for j in range(bn):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(block, 0)[:M].repeat_interleave(block, 1)[:, :N]
    return (w / full).to(torch.float8_e4m3fn), scale


def test_fp8_block_quantized_checkpoint_is_dequantized_on_load(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    reference = {}
    for key in list(tensors):
        t = tensors[key]
        if t.dim() == 2 and key.endswith("proj.weight"):
            q, scale = quantize_fp8(t, block=16)
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            full = scale.repeat_interleave(16, 0)[:t.shape[0]].repeat_interleave(16, 1)[:, :t.shape[1]]
            reference[key] = q.float() * full
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path)
    sd = loaded.state_dict()
    torch.testing.assert_close(sd["model.layers.0.self_attn.kv_b_proj.weight"],
                               reference["model.layers.0.self_attn.kv_b_proj.weight"], atol=0, rtol=0)
    gate_up = sd["model.layers.1.mlp.experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    torch.testing.assert_close(gate_up[3, inter:], reference["model.layers.1.mlp.experts.3.up_proj.weight"], atol=0, rtol=0)
    # FP8 keeps about two significant digits: the model still computes nearly the same function.
    ids = torch.randint(0, 53, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max() < 0.05


def corrupt(tmp_path, edit):
    tiny().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_tensors_are_refused_by_name(tmp_path):
    corrupt(tmp_path, lambda t: (t.pop("model.layers.2.self_attn.o_proj.weight"),
                                 t.pop("model.layers.1.mlp.experts.5.up_proj.weight")))
    with pytest.raises(CheckpointError, match=r"missing: .*model\.layers\.1\.mlp\.experts.*model\.layers\.2\.self_attn\.o_proj"):
        load_pretrained(tmp_path)


def test_unexpected_tensors_are_refused_by_name(tmp_path):
    corrupt(tmp_path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.0\.self_attn\.extra\.weight"):
        load_pretrained(tmp_path)


def test_misshaped_tensors_are_refused_with_both_shapes(tmp_path):
    corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped: model\.norm\.weight: checkpoint \(7,\), model \(64,\)"):
        load_pretrained(tmp_path)


def test_mtp_layers_are_saved_as_extra_layers_and_loaded_back(tmp_path):
    model = tiny(num_nextn_predict_layers=1)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    L = model.config.num_hidden_layers
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
                 "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.0.gate_proj.weight"):
        assert f"model.layers.{L}.{part}" in keys
    loaded = load_pretrained(tmp_path)
    assert len(loaded.mtp) == 1
    ids = torch.randint(0, 53, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h1, h2 = model.hidden_states(ids), loaded.hidden_states(ids)
        torch.testing.assert_close(loaded.mtp_loss(h2, ids), model.mtp_loss(h1, ids), atol=0, rtol=0)


def test_checkpoint_without_mtp_weights_loads_without_mtp(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # as transformers writes by default, with no MTP weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert len(load_pretrained(tmp_path).mtp) == 0


def test_tied_embeddings_save_one_tensor(tmp_path):
    model = tiny(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    same_logits(loaded, model)


def test_saving_over_a_checkpoint_keeps_tokenizer_files(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))  # no temporary directory left behind
