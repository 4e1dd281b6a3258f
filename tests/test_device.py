"""The recipe's `device`: spelled auto, cpu, cuda or cuda:N, resolved in one place (grpo.build.resolve_device),
and honoured end to end: the trainer's step, SFT, the R1 pipeline, checkpoints, resume, `grpo eval` and
`grpo generate`. The tests taking the `device` fixture run on the CPU here and on CUDA on a GPU machine."""

import json

import devices
import pytest
import torch

from grpo import distributed
from grpo.build import build_policy, build_reference, build_tokenizer, resolve_device
from grpo.cli import main
from grpo.config import RecipeError, load_recipe
from grpo.sft import SFTTrainer
from grpo.trainer import GRPOTrainer

device = devices.device


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ----- the key ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["gpu", "CPU", "cuda:x", "cuda0", "cuda:-1", "mps"])
def test_a_device_spelling_not_allowed_names_the_key_and_what_is_allowed(spelling):
    with pytest.raises(RecipeError, match=r"device: '.*' is not allowed; allowed: 'auto' .*'cpu', 'cuda', 'cuda:N'"):
        load_recipe(overrides=["model.preset=micro", f"device={spelling}"])


def test_every_allowed_spelling_loads_whatever_the_machine_has(monkeypatch):
    no_gpu(monkeypatch)  # availability is checked when the recipe is built, so a GPU recipe dry-runs anywhere
    assert load_recipe(overrides=["model.preset=micro"]).device == "auto"
    for spelling in ("auto", "cpu", "cuda", "cuda:3"):
        assert load_recipe(overrides=["model.preset=micro", f"device={spelling}"]).device == spelling


# ----- resolving it -------------------------------------------------------------------------------------------
def test_auto_is_cuda_where_torch_sees_a_gpu_else_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_an_error_naming_the_key(monkeypatch):
    no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu")
    for spelling in ("cuda", "cuda:0"):
        with pytest.raises(RecipeError, match=rf"device: '{spelling}', but torch sees no CUDA device"):
            resolve_device(spelling)
    with pytest.raises(RecipeError, match="--device: 'cuda', but torch sees no CUDA device"):
        resolve_device("cuda", key="--device")


def test_under_torchrun_each_rank_takes_its_local_gpu(monkeypatch):
    two_gpus(monkeypatch)
    assert resolve_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0, world_size=2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RecipeError, match="device: 'cuda:1' names one GPU, but torchrun started 2 processes"):
        resolve_device("cuda:1", local_rank=0, world_size=2)
    with pytest.raises(RecipeError, match=r"device: cuda:2 is asked for, but torch sees 2 CUDA device\(s\)"):
        resolve_device("cuda", local_rank=2, world_size=4)
    assert distributed.backend(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
    assert distributed.backend("cpu") == "gloo"


def test_grpo_train_asking_for_a_missing_gpu_stops_before_any_work(tmp_path, micro_recipe, monkeypatch, capsys):
    no_gpu(monkeypatch)
    assert main(["train", str(micro_recipe()), "device=cuda"]) == 2
    assert "error: device: 'cuda', but torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----- honoured ---------------------------------------------------------------------------------------------
def test_the_reference_is_bfloat16_on_cuda_and_keeps_the_routing_bias_in_float32(device):
    recipe = load_recipe(overrides=["model.preset=micro", f"device={device}"])
    policy = build_policy(recipe, build_tokenizer(recipe))
    reference = build_reference(policy)
    assert policy.lm_head.weight.device.type == reference.lm_head.weight.device.type == device
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16 if device == "cuda" else torch.float32}
    assert all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in reference.moe_layers())
    assert not any(p.requires_grad for p in reference.parameters())


def test_a_training_step_keeps_its_tensors_on_the_policys_device(micro_recipe, device):
    # A reference (beta) and two updates per generation (old log-probs): every tensor the step makes.
    recipe = load_recipe(micro_recipe(device=device, algorithm={"beta": 0.04, "num_iterations": 2},
                                      optim={"micro_batch_size": 8}))
    trainer = GRPOTrainer(recipe)
    where = trainer.policy.lm_head.weight.device
    assert where.type == device and trainer.reference.lm_head.weight.device == where
    ro, stats = trainer.collect()
    batch = trainer.global_batch(ro, stats)
    assert len(batch.micro_batches) == 2
    for b in [*batch.micro_batches, trainer._empty_batch(ro)]:
        assert {k: v.device for k, v in b.items()} == dict.fromkeys(b, where)
    old, ref = trainer.old_and_reference_logprobs(batch.micro_batches)
    assert {t.device for t in old + ref} == {where}
    sums, grad_norm = trainer.update(batch, old, ref)
    assert torch.isfinite(torch.tensor([grad_norm, sums["loss"]])).all()
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert state and {t.device for t in state} == {where}


def test_sft_batches_live_on_the_models_device(micro_recipe, device):
    trainer = SFTTrainer(load_recipe(micro_recipe(device=device, sft={"batch_size": 4})))
    ids, mask = trainer.batch()
    assert ids.device == mask.device == trainer.model.lm_head.weight.device
    assert ids.device.type == device


def test_sft_train_resume_eval_and_generate_run_on_the_recipes_device(tmp_path, micro_recipe, device, capsys):
    """A micro recipe end to end, its device from the command line: SFT, GRPO from the SFT model with
    checkpoints saved from the device, a resume loaded back onto it, `grpo eval` and `grpo generate`."""
    path = micro_recipe(sft={"steps": 2, "batch_size": 4}, logging={"save_every": 1, "tensorboard": False,
                                                                    "progress_bar": False})
    run = tmp_path / "run"
    assert main(["sft", str(path), f"device={device}"]) == 0
    grpo = [str(path), f"device={device}", "model.preset=null", f"model.path={run / 'sft' / 'model'}"]
    assert main(["train", *grpo, "max_steps=1"]) == 0
    assert main(["train", *grpo, "max_steps=2", "--resume"]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    last = run / "checkpoints" / "step-000002" / "model"
    assert main(["eval", "--model", str(last), "--benchmark", "addition", "--limit", "2", "--max-tokens", "4",
                 "--template", "{prompt}=", "--output", str(tmp_path / "eval"), "--device", device]) == 0
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["summary"]["num_problems"] == 2
    assert main(["generate", "--model", str(last), "--prompt", "1+2=", "--max-tokens", "3", "--device", device]) == 0
    assert "--- '1+2='" in capsys.readouterr().out


@pytest.mark.slow
def test_the_r1_pipeline_runs_every_stage_on_the_recipes_device(tmp_path, micro_recipe, device):
    path = micro_recipe(sft={"steps": 2, "batch_size": 4}, evaluation={"n": 1, "limit": 4})
    assert main(["r1", str(path), f"device={device}"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["device"] == str(resolve_device(device))
    assert set(report["stages"]) == {"sft", "eval_sft", "grpo", "eval_grpo"}
