"""Recipes: typed dataclass sections loaded from YAML, with `key.sub=value` overrides from the command line.
An unknown key or a bad value stops before any work, with a message naming it and what is allowed."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml

from .advantages import ADVANTAGE_ESTIMATORS
from .losses import POLICY_LOSSES, ImportanceSamplingLevel, KLEstimator


class RecipeError(ValueError):
    """A recipe key or value that is not allowed."""


DEVICE_SPELLING = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICES_ALLOWED = "'auto' (CUDA when torch sees a GPU, else cpu), 'cpu', 'cuda', 'cuda:N' (N a GPU index)"


def check_device(spec: str, key: str = "device") -> None:
    """Refuses a device spelling other than auto, cpu, cuda, cuda:N; whether the machine has it is checked
    where the recipe is built (`grpo.build.resolve_device`), so a GPU recipe can be dry-run on a laptop."""
    if not isinstance(spec, str) or not DEVICE_SPELLING.fullmatch(spec):
        raise RecipeError(f"{key}: {spec!r} is not allowed; allowed: {DEVICES_ALLOWED}")


@dataclass(frozen=True)
class OneOf:
    """`Annotated[str, OneOf(registry)]`: a field whose allowed values are a registry's keys, read when a
    recipe is checked, so the registry is the one place the names are written."""

    registry: Mapping[str, Any]


@dataclass
class ModelSection:
    path: str | None = None  # a Hugging Face checkpoint directory
    preset: str | None = None  # or build from scratch: tiny, micro, tiny-vllm (model/presets.py)
    tokenizer: str | None = None  # a tokenizer directory; default: the model's, else the built-in "char"
    # The training compute: bfloat16 is autocast over float32 master weights; rollouts on vLLM run in it.
    dtype: Literal["float32", "bfloat16"] = "float32"
    mtp: int = 0  # MTP depths when building from scratch
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields when building from scratch


@dataclass
class DataSection:
    source: str = "addition"  # a built-in task (addition, arithmetic, countdown), a .jsonl/.parquet file, a hub name
    split: str = "train"
    limit: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    field_map: dict[str, str] = field(default_factory=dict)  # column renames, e.g. {question: prompt}
    template: str = "r1_zero"  # r1_zero, chat, plain, tiny, or a format string with {prompt}
    # held-out rows for eval_steps: a benchmark (gsm8k, math500, a task, a file, a Hub dataset) read like
    # `grpo eval --benchmark`; default: the test split of the training source
    eval_source: str | None = None
    eval_limit: int = 64


@dataclass
class RewardSpec:
    name: str = "accuracy"  # a registry name, pkg.mod:fn or path/file.py:fn
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingSection:
    num_generations: int = 8  # G, completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_completion_length: int = 256
    stop: list[str] = field(default_factory=list)


@dataclass
class RolloutSection:
    backend: Literal["ours", "vllm"] = "ours"
    cache_memory_mb: int = 256
    # On CUDA: size our engine's latent cache as this share of the GPU memory free when it starts (vLLM's option
    # of that name) instead of cache_memory_mb; elsewhere cache_memory_mb serves.
    gpu_memory_utilization: float | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    # Our engine's weights for decoding: auto (bfloat16 on CUDA, where it keeps a bf16 copy of a float32
    # policy refreshed once per step; the policy's own dtype elsewhere), float32 or bfloat16.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Our engine: run decode steps through graphs compiled ahead of time (needs a C++ compiler; the first
    # run of a model shape compiles for tens of seconds, then the packages are cached on disk).
    compile: bool = False
    # Our engine on CUDA: launch each decode step before reading the last one's tokens, so the host's work per
    # step overlaps the device's (Engine(overlap=True); the same completions). Off by default until measured.
    overlap: bool = False


@dataclass
class ToolsSection:
    """Multi-turn tool use (grpo/tools.py, grpo/rollout/episodes.py); no names: single-turn completions."""

    names: list[str] = field(default_factory=list)  # registered tools (python) or pkg.mod:fn / path.py:fn functions
    max_tool_calls: int = 4  # calls run per completion; a further call ends it
    timeout_s: float = 10.0  # each call's limit
    max_workers: int = 4  # calls running at once
    max_output_chars: int = 1024  # a longer result is cut
    options: dict[str, Any] = field(default_factory=dict)  # per tool name, e.g. {python: {syntax: tags}}
    # Training rollouts: the other sequences decode while calls run, each resuming when its call returns (else
    # the batch waits for each step's calls). Batches then depend on the tools' timing; evaluation never overlaps.
    overlap: bool = False


@dataclass
class AlgorithmSection:
    loss_type: Annotated[str, OneOf(POLICY_LOSSES)] = "dapo"  # grpo, bnpo, dr_grpo, dapo, cispo (grpo/losses.py)
    scale_rewards: Annotated[str, OneOf(ADVANTAGE_ESTIMATORS)] = "group"  # group, batch, none (grpo/advantages.py)
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher (DAPO uses 0.28); default: epsilon
    importance_sampling_level: ImportanceSamplingLevel = "token"
    beta: float = 0.0  # KL to a frozen reference; 0 builds no reference model
    kl_estimator: KLEstimator = "k3"
    num_iterations: int = 1  # mu: updates per generation
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill from more prompts
    max_sampling_rounds: int = 3
    mask_truncated_completions: bool = False
    entropy_coef: float = 0.0
    rollout_is_cap: float | None = None  # truncated importance-sampling correction of rollout/trainer mismatch
    router_bias_update_speed: float = 0.0  # aux-loss-free balancing during RL; 0 freezes the bias
    # MoE routing replay: the training forward sends each token to the experts that sampled it in the rollout.
    routing_replay: bool = False


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 32  # completions per forward/backward
    gradient_checkpointing: bool = False
    # torch.compile each decoder block for the full-sequence forwards and backward (CausalLM.compile_blocks):
    # about 10% off a training step on a CPU, after a compile of tens of seconds at the first step.
    compile: bool = False


@dataclass
class LoggingSection:
    log_every: int = 1
    save_every: int = 50
    keep_last: int = 2
    eval_steps: int = 0  # 0: no periodic evaluation
    tensorboard: bool = True
    completions_per_step: int = 4  # written to completions.jsonl
    progress_bar: bool = True


@dataclass
class SFTSection:
    """Cold-start SFT (`grpo sft`): supervised training on prompt/completion pairs."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: Literal["constant", "cosine"] = "cosine"
    # The completion: a column of the data, or (when absent) the R1 format built from `reasoning` and `answer`.
    completion_column: str = "completion"
    mtp_weight: float = 0.0  # weight of the multi-token-prediction loss (needs model.mtp > 0)
    output_dir: str | None = None  # default: <output_dir>/sft


@dataclass
class EvaluationSection:
    """How `grpo r1` scores the SFT and GRPO checkpoints on held-out problems (the data's test split)."""

    n: int = 4  # samples per problem; pass@1 is their mean
    temperature: float = 1.0  # 0: greedy (then n must be 1)
    limit: int = 128  # held-out problems


@dataclass
class Recipe:
    output_dir: str = "runs/grpo"
    max_steps: int = 100
    seed: int = 0
    prompts_per_step: int = 8  # the GLOBAL batch: split over the ranks of a torchrun job
    parallel: Literal["ddp", "fsdp"] = "ddp"  # how several ranks train: replicas (DDP) or shards (FSDP2)
    # Where the models train, sample and are evaluated: auto, cpu, cuda or cuda:N (auto: CUDA when torch sees
    # a GPU). Under torchrun each rank takes cuda:LOCAL_RANK (`grpo.build.resolve_device`).
    device: str = "auto"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy"), RewardSpec("format")])
    sampling: SamplingSection = field(default_factory=SamplingSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    tools: ToolsSection = field(default_factory=ToolsSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    optim: OptimSection = field(default_factory=OptimSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    sft: SFTSection = field(default_factory=SFTSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    reward_on_error: Literal["raise", "none"] = "raise"
    # The code reward's sandbox: auto hides the filesystem where this machine allows (bubblewrap, or unshare
    # as root) and else warns; strict refuses to start without that (rewards/sandbox_fs.py).
    reward_sandbox: Literal["auto", "strict"] = "auto"

    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise RecipeError(f"{key}: {msg}")

        check_device(self.device)
        need(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        need(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        need((self.model.path is None) != (self.model.preset is None), "model",
             "give exactly one of model.path (a checkpoint) or model.preset (build from scratch)")
        need(self.sampling.num_generations >= 2, "sampling.num_generations",
             f"GRPO compares samples within a group: needs >= 2, got {self.sampling.num_generations}")
        need(self.sampling.max_completion_length >= 1, "sampling.max_completion_length", "must be >= 1")
        need(self.sampling.temperature > 0, "sampling.temperature", "must be > 0 for GRPO sampling")
        need(0 < self.sampling.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.sampling.top_p}")
        gpu_share = self.rollout.gpu_memory_utilization
        need(gpu_share is None or 0 < gpu_share < 1, "rollout.gpu_memory_utilization",
             f"must be in (0, 1) (a share of the free GPU memory) or null, got {gpu_share}")
        need(not (self.rollout.overlap and self.rollout.backend == "vllm"), "rollout.overlap",
             "is our engine's (rollout.backend: ours); vLLM schedules its own steps")
        need(self.algorithm.epsilon > 0, "algorithm.epsilon", "must be > 0")
        need(self.algorithm.beta >= 0, "algorithm.beta", "must be >= 0")
        need(self.algorithm.num_iterations >= 1, "algorithm.num_iterations", "must be >= 1")
        need(self.optim.lr >= 0, "optim.lr", "must be >= 0 (0 keeps the policy fixed: a control run)")
        need(self.optim.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")
        need(len(self.rewards) >= 1, "rewards", "name at least one reward")
        need(not (self.optim.compile and self.parallel == "fsdp"), "optim.compile",
             "is not supported with parallel: fsdp (the rollout copy of a sharded policy)")
        need(not (self.algorithm.routing_replay and self.rollout.backend == "vllm"), "algorithm.routing_replay",
             "needs rollout.backend: ours (vLLM does not return the experts it routed to)")
        need(not (self.tools.names and self.rollout.backend == "vllm"), "tools",
             "multi-turn tool episodes run on rollout.backend: ours (vLLM's backend cannot pause a sequence for a "
             "tool and resume it from its cache)")
        need(self.tools.max_tool_calls >= 0, "tools.max_tool_calls", f"must be >= 0, got {self.tools.max_tool_calls}")
        need(self.tools.timeout_s > 0, "tools.timeout_s", f"must be > 0, got {self.tools.timeout_s}")
        need(self.tools.max_workers >= 1, "tools.max_workers", f"must be >= 1, got {self.tools.max_workers}")
        need(not self.tools.overlap or bool(self.tools.names), "tools.overlap",
             "overlaps tool calls with decoding, but tools.names is empty (no tools): name the tools or drop it")
        need(self.evaluation.n >= 1, "evaluation.n", f"must be >= 1, got {self.evaluation.n}")
        need(self.evaluation.temperature > 0 or self.evaluation.n == 1, "evaluation.n",
             "greedy evaluation (temperature 0) gives one answer per problem: use n: 1")
        need(self.evaluation.limit >= 1, "evaluation.limit", "must be >= 1")
        need(self.logging.keep_last >= 1, "logging.keep_last", "must be >= 1")
        need(self.logging.save_every >= 1, "logging.save_every", "must be >= 1")


# ----- loading ----------------------------------------------------------------------------------------------
def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks `value` against the type hint `hint`, building nested dataclasses; names `key` on error."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *extras = get_args(hint)
        value = _coerce(value, base, key)
        for extra in extras:
            if isinstance(extra, OneOf) and value not in extra.registry:
                allowed = ", ".join(map(repr, extra.registry))
                raise RecipeError(f"{key}: {value!r} is not allowed; allowed: {allowed}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise RecipeError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(hint) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise RecipeError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise RecipeError(f"unknown key {key!r}; allowed here: {', '.join(names)}")
        if cls is Recipe and k == "rewards" and isinstance(v, list):
            v = [{"name": r} if isinstance(r, str) else r for r in v]
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'algorithm.beta=0.04' -> (['algorithm', 'beta'], 0.04); the value is read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Reads a YAML recipe (or the defaults when path is None), applies overrides, validates."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise RecipeError(f"recipe {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise RecipeError(f"recipe {path}: expected a mapping at the top level")
        data = loaded or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
        node[keys[-1]] = value
    recipe = _build(Recipe, data)
    recipe.validate()
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
