"""Where a recipe becomes objects: the tokenizer, the data rows, the rewards, the policy (and its frozen
reference), the rollout engine, the optimizer and its learning-rate schedule. The trainers, the CLI, the dry
run, the R1 pipeline and evaluation all build through here, so each piece is made one way.

`resolve_device` turns the recipe's `device` into the torch device this process's models live on."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Any

import torch

import rewards as rewards_lib
from model import CausalLM, build_model, load_pretrained
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer, load_tokenizer
from rewards.sandbox_fs import require_strict

from .config import Recipe, RecipeError, RolloutSection, check_device
from .data import load_rows
from .rollout.cpu_features import cpu_has_bf16_dot
from .rollout.protocol import RolloutEngine

Device = str | torch.device


# ----- tokenizer, data, rewards ----------------------------------------------------------------------------
def build_tokenizer(recipe: Recipe):
    """model.tokenizer when given ("char": the built-in one), else the checkpoint's own, else "char"."""
    m = recipe.model
    if m.tokenizer and m.tokenizer != "char":
        return load_tokenizer(m.tokenizer)
    if m.tokenizer is None and m.path and (Path(m.path) / "tokenizer_config.json").exists():
        return load_tokenizer(m.path)
    return build_char_tokenizer()


def build_rows(recipe: Recipe, limit: int | None = None) -> list[dict[str, Any]]:
    """The training rows of `recipe.data` (the first `limit` of them; default data.limit)."""
    d = recipe.data
    return load_rows(d.source, split=d.split, limit=d.limit if limit is None else limit, seed=recipe.seed,
                     task_options=d.task_options, field_map=d.field_map)


def reward_entries(recipe: Recipe) -> list[dict[str, Any]]:
    """The recipe's rewards as `rewards.RewardSet.from_config` entries."""
    return [{"reward": r.name, "weight": r.weight, "options": r.options} for r in recipe.rewards]


def build_rewards(recipe: Recipe, on_error: str | None = None) -> rewards_lib.RewardSet:
    """The recipe's weighted rewards; on_error: default the recipe's `reward_on_error`.

    Raises:
        SandboxUnavailable: `reward_sandbox: strict` where the code sandbox cannot hide the filesystem."""
    if recipe.reward_sandbox == "strict":
        require_strict("reward_sandbox")
    return rewards_lib.RewardSet.from_config(reward_entries(recipe), on_error=on_error or recipe.reward_on_error)


def build_toolbox(recipe: Recipe):
    """The recipe's tools (`recipe.tools`) as a `grpo.tools.Toolbox`, or None when it names none."""
    t = recipe.tools
    if not t.names:
        return None
    from .tools import Toolbox

    return Toolbox(t.names, max_workers=t.max_workers, timeout_s=t.timeout_s, max_output_chars=t.max_output_chars,
                   options=t.options)


# ----- the device -------------------------------------------------------------------------------------------
def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1, key: str = "device") -> torch.device:
    """The device a recipe's `device` (auto, cpu, cuda, cuda:N) means for this process: auto is CUDA when
    torch sees a GPU, else the CPU; under torchrun (world_size > 1) CUDA is cuda:LOCAL_RANK, one GPU a rank.
    `key` names the setting in errors (a recipe key, or a command-line flag).

    Raises:
        RecipeError: a spelling not allowed; CUDA asked for where torch sees none, or a GPU index it lacks;
            cuda:N under torchrun, where each rank takes its own GPU."""
    check_device(spec, key)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RecipeError(f"{key}: {spec!r}, but torch sees no CUDA device (torch {torch.__version__}, "
                          f"torch.cuda.is_available() is False); use cpu, or auto (CUDA where there is a GPU)")
    if ":" in spec and world_size > 1:
        raise RecipeError(f"{key}: {spec!r} names one GPU, but torchrun started {world_size} processes, each "
                          f"taking cuda:LOCAL_RANK; use cuda or auto")
    index = int(spec.split(":")[1]) if ":" in spec else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise RecipeError(f"{key}: cuda:{index} is asked for, but torch sees {count} CUDA device(s) "
                          f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)


# ----- models ---------------------------------------------------------------------------------------------
def build_policy(recipe: Recipe, tokenizer, device: Device | None = None) -> CausalLM:
    """The trained model on `device` (default: the recipe's, `resolve_device`), in float32 whatever
    `model.dtype` says: these are the master weights that AdamW updates (a bf16 weight would round away an
    update of lr 1e-6). See `compute_precision`."""
    m = recipe.model
    device = resolve_device(recipe.device) if device is None else device
    if m.path:
        return load_pretrained(m.path, dtype=torch.float32, device=device)
    cfg = preset_config(m.preset, vocab_size=len(tokenizer), num_nextn_predict_layers=m.mtp, **m.overrides)
    # Initialized on the CPU from a CPU generator, then moved: one seed gives the same weights on any device.
    return build_model(cfg, seed=recipe.seed).to(device)


def build_reference(policy: CausalLM) -> CausalLM:
    """A frozen copy of the policy: the KL penalty's reference (algorithm.beta > 0). On CUDA its weights are
    bfloat16, half the memory of a second float32 model; its buffers (the routing bias, RoPE tables) stay
    float32 as `load_pretrained` leaves them. On a CPU it stays float32, as it always was."""
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if policy.lm_head.weight.device.type == "cuda":
        for p in reference.parameters():  # not .to(bfloat16), which would round the float32 routing bias
            p.data = p.data.to(torch.bfloat16)
    return reference


def compute_precision(recipe: Recipe, model: CausalLM):
    """The training forward's precision: `model.dtype: bfloat16` runs matmuls in bf16 under autocast over
    the float32 master weights (the router stays in float32); float32 changes nothing."""
    if recipe.model.dtype != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(model.lm_head.weight.device.type, dtype=torch.bfloat16)


# ----- the rollout engine ---------------------------------------------------------------------------------
def build_engine(model: CausalLM, tokenizer, rollout: RolloutSection | None = None, *, seed: int = 0,
                 record_routing: bool = False, dtype: str = "float32", start_dir: str | Path | None = None,
                 checkpoint_dir: str | Path | None = None) -> RolloutEngine:
    """The rollout engine `rollout` (a recipe's `rollout` section; default its defaults) describes.

    ours: our engine, running `model` itself, or a copy in `rollout.dtype` refreshed from it (an optimizer step
        is seen at the next generate).
    vllm: vLLM, started from `checkpoint_dir` when the model is one on disk, else from the model as it is
        now, written to `start_dir`; later weights reach it through `update_weights`. `dtype` is the
        policy's compute dtype (vLLM's own default here is float32, twice the memory of a bf16 model).
    """
    r = rollout or RolloutSection()
    if r.backend == "vllm":
        from .rollout.vllm_backend import VLLMEngine

        start = checkpoint_dir
        if start is None:
            if start_dir is None:
                raise ValueError("rollout.backend vllm needs a checkpoint_dir or a start_dir to write the model to")
            start = Path(start_dir)
            model.save_pretrained(start)
            tokenizer.save_pretrained(start)
        return VLLMEngine(start, dtype=dtype, kv_cache_memory_bytes=r.cache_memory_mb * 1024**2, seed=seed,
                          tokenizer=tokenizer)
    from .rollout.engine import Engine

    on_cuda = model.lm_head.weight.device.type == "cuda"
    if r.overlap and not on_cuda:
        raise RecipeError(f"rollout.overlap: runs decode steps ahead on a CUDA device (its decode graphs sample on "
                          f"the device), but the policy is on {model.lm_head.weight.device}; set it false")
    decode_dtype = (torch.bfloat16 if on_cuda else None) if r.dtype == "auto" else getattr(torch, r.dtype)
    if decode_dtype == torch.bfloat16 and model.lm_head.weight.device.type == "cpu" and not cpu_has_bf16_dot():
        # measured on an AVX2-only EPYC: a tenth of float32's tokens/s, compiled or eager (README, Rollouts)
        warnings.warn("rollout.dtype: bfloat16 on a CPU without AVX-512 BF16 or AMX, where every bfloat16 matmul "
                      "is converted to float32 and back: expect about a tenth of float32's rollout speed; "
                      "rollout.dtype: auto keeps float32 on such a CPU", RuntimeWarning, stacklevel=2)
    return Engine(model, tokenizer, block_size=r.block_size, cache_memory_bytes=r.cache_memory_mb * 1024**2,
                  max_num_seqs=r.max_num_seqs, seed=seed, record_routing=record_routing, compile=r.compile,
                  gpu_memory_utilization=r.gpu_memory_utilization if on_cuda else None, dtype=decode_dtype,
                  overlap=r.overlap)


def build_rollout_engine(recipe: Recipe, model: CausalLM, tokenizer, rank: int = 0) -> RolloutEngine:
    """The training run's engine: `recipe.rollout` over the rollout policy, seeded by the recipe."""
    start = Path(recipe.output_dir) / ("rollout_start" if rank == 0 else f"rollout_start-rank{rank}")
    return build_engine(model, tokenizer, recipe.rollout, seed=recipe.seed,
                        record_routing=recipe.algorithm.routing_replay, dtype=recipe.model.dtype, start_dir=start)


# ----- optimizer and learning-rate schedule -----------------------------------------------------------------
def adamw(params, lr: float, betas, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW as one fused kernel over all tensors (fused=False: the multi-tensor foreach update, for FSDP's
    sharded parameters). PyTorch's default on a CPU is a loop of a dozen ops per tensor. On the tiny model's
    60 tensors a step takes 26 ms that way, 17 ms with foreach and 5 ms fused. The fused kernel does not move
    the weights' version counters, so the rollout engine re-derives its weights at every generate call."""
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kind)


def lr_factor(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0):
    """The learning-rate multiplier per step: linear warmup, then constant or cosine down to min_ratio."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str,
                min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of `lr_factor`, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup_steps, total_steps, schedule, min_ratio))


def build_optimizer(recipe: Recipe, model: CausalLM, fused: bool = True):
    """The GRPO optimizer (`recipe.optim`) over `model`'s parameters and its LR schedule over max_steps."""
    o = recipe.optim
    optimizer = adamw(model.parameters(), o.lr, o.betas, o.weight_decay, fused=fused)
    return optimizer, lr_schedule(optimizer, o.warmup_steps, recipe.max_steps, o.schedule, o.min_lr_ratio)
