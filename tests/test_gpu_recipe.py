"""The GPU recipe (recipes/v2_lite_gsm8k.yaml), validated on CPU: it loads as shipped; the dry run checks it
against DeepSeek-V2-Lite's real config.json (no weights) and prints the numbers docs/gpu_recipe.md states;
and the recipe trains for real on a few-MB stand-in with V2-Lite's structure and GSM8K-format data."""

import json
from pathlib import Path

import pytest

from grpo.cli import main
from grpo.config import load_recipe
from grpo.dryrun import GB, estimate_memory, min_gpus, model_size
from model import ModelConfig, build_model
from model.tokenizer import build_char_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "v2_lite_gsm8k.yaml"

# DeepSeek-V2-Lite(-Chat)'s published config.json, less the fields that do not change the model.
V2_LITE = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "routed_scaling_factor": 1.0, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "torch_dtype": "bfloat16",
}
# The same structure (softmax greedy routing, shared experts, one dense layer first, no query LoRA, YaRN) at a
# few MB; the experts stay top-6 of more than 6 so routing is still a choice.
STAND_IN = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, kv_lora_rank=16,
                qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
GSM8K_ROWS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 6 eggs. How many eggs are in 5 boxes?", "6 * 5 = <<6*5=30>>30\n#### 30"),
    ("Sara had 20 dollars and spent 8. How many dollars are left?", "20 - 8 = <<20-8=12>>12\n#### 12"),
    ("Each of 4 cats eats 2 cans a day. How many cans do they eat in a day?", "4 * 2 = <<4*2=8>>8\n#### 8"),
    ("A train goes 60 miles an hour for 2 hours. How far does it go?", "60 * 2 = <<60*2=120>>120\n#### 120"),
    ("Ben reads 10 pages a day. How many pages does he read in 7 days?", "10 * 7 = <<10*7=70>>70\n#### 70"),
]


def write_gsm8k(path: Path) -> Path:
    """GSM8K's layout: `question`, and `answer` a worked solution ending in "#### N"."""
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K_ROWS))
    return path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A checkpoint whose config.json has V2-Lite's structure, its tokenizer, and GSM8K-format train and test files."""
    root = tmp_path_factory.mktemp("v2_lite")
    tok = build_char_tokenizer()
    cfg = ModelConfig.from_hf_dict({**V2_LITE, **STAND_IN, "vocab_size": len(tok), "bos_token_id": 1,
                                    "eos_token_id": 2, "pad_token_id": 0})
    build_model(cfg, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"model": root / "model", "train": write_gsm8k(root / "gsm8k_train.jsonl"),
            "test": write_gsm8k(root / "gsm8k_test.jsonl")}


def test_the_recipe_loads_as_shipped():
    r = load_recipe(RECIPE)
    assert r.model.path and r.model.dtype == "bfloat16" and r.rollout.backend == "vllm"
    assert r.data.field_map == {"question": "prompt"} and r.optim.gradient_checkpointing
    assert r.algorithm.epsilon_high > r.algorithm.epsilon and r.algorithm.loss_type in ("dapo", "dr_grpo")


def test_the_stand_in_has_v2_lite_structure(stand_in):
    cfg = ModelConfig.from_json(stand_in["model"])
    written = json.loads((stand_in["model"] / "config.json").read_text())
    assert written["model_type"] == "deepseek_v2" and cfg.q_lora_rank is None
    assert (cfg.scoring_func, cfg.topk_method, cfg.first_k_dense_replace, cfg.n_shared_experts) == ("softmax", "greedy", 1, 2)
    assert cfg.rope_scaling.factor == 40 and not cfg.norm_topk_prob
    assert sum(f.stat().st_size for f in stand_in["model"].iterdir()) < 5e6


def test_dry_run_without_the_model_says_how_to_get_it(capsys):
    assert main(["train", str(RECIPE), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "huggingface-cli download deepseek-ai/DeepSeek-V2-Lite-Chat" in err


def test_dry_run_on_v2_lite_config_prints_the_documented_resources(tmp_path, stand_in, capsys):
    """The real config.json with no weights: the architecture and the memory the docs state."""
    (tmp_path / "config.json").write_text(json.dumps(V2_LITE))
    argv = ["train", str(RECIPE), f"model.path={tmp_path}", f"data.source={stand_in['train']}",
            f"data.eval_source={stand_in['test']}", "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for expected in ["deepseek_v2, 27 layers (1 dense, 26 MoE)", "64 routed (top-6, softmax, greedy) + 2 shared",
                     "15.71B total, 2.66B active per token (2.45B without the embedding table)",
                     "31,104 bytes per token", "2 B x P = 31.4 GB", "16 B x P = 251.3 GB",
                     "rollout weights (vllm): 31.4 GB on every GPU", "without FSDP: does not fit",
                     "first prompt (r1_zero)", "accuracy ", "dry run: OK"]:
        assert expected in text, expected


def test_memory_arithmetic_matches_the_docs():
    """docs/gpu_recipe.md works the estimate by hand for 256-token prompts; these are its numbers."""
    cfg = ModelConfig.from_hf_dict(V2_LITE)
    size = model_size(cfg)
    assert (size.total, size.active, size.embedding) == (15_706_484_224, 2_661_150_208, 209_715_200)
    mem = estimate_memory(cfg, size, load_recipe(RECIPE), prompt_tokens=256)
    assert mem.kv_per_token == (512 + 64) * 27 * 2 == 31_104
    assert round(mem.kv_step / GB, 1) == 20.4  # 512 sequences x 1280 tokens
    assert round(mem.activations / GB, 1) == 3.5
    assert round(mem.per_gpu(1, fsdp=False) / GB) == 321
    assert [round(mem.per_gpu(n, fsdp=True) / GB, 1) for n in (4, 8, 16)] == [103.3, 71.9, 56.2]
    assert min_gpus(mem, 80 * GB, fsdp=True) == 8 and min_gpus(mem, 80 * GB, fsdp=False) is None
    assert min_gpus(mem, 141 * GB, fsdp=True) == 4


@pytest.mark.slow  # about 35 s on 2 cores: bf16 on CPU and 600-character prompts (the char tokenizer)
def test_the_recipe_trains_on_the_stand_in(tmp_path, stand_in):
    """The real recipe with only what a CPU needs changed: the stand-in, our engine, short completions, 2 steps."""
    out = tmp_path / "run"
    argv = ["train", str(RECIPE), f"output_dir={out}", f"model.path={stand_in['model']}",
            f"data.source={stand_in['train']}", f"data.eval_source={stand_in['test']}", "data.eval_limit=2",
            "rollout.backend=ours", "rollout.cache_memory_mb=64", "prompts_per_step=2", "sampling.num_generations=2",
            "sampling.max_completion_length=8", "max_steps=2", "logging.eval_steps=2", "logging.save_every=2",
            "logging.tensorboard=false", "logging.progress_bar=false"]
    assert main(argv) == 0
    assert (out / "checkpoints" / "step-000002" / "model" / "config.json").exists()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and "eval/pass@1" in metrics[-1]
    assert "rewards/accuracy/mean" in metrics[0]
