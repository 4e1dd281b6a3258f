"""The R1 loop, one step at a time: sample prompts, generate G completions each, score them, compute
group-relative advantages, update the policy, log, checkpoint. Losses and advantages are pure functions
(grpo/losses.py, grpo/advantages.py); this file wires them to the model, the engine and the rewards."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from model import CausalLM, load_pretrained

from . import distributed
from .advantages import GroupAdvantages, group_advantages
from .batch import Rollout, RolloutStats
from .benchmarks import load_eval_rows
from .build import (
    build_engine,
    build_optimizer,
    build_policy,
    build_reference,
    build_rewards,
    build_rollout_engine,
    build_rows,
    build_tokenizer,
    build_toolbox,
    compute_precision,
    resolve_device,
)
from .checkpointing import latest_checkpoint, load_state, save_checkpoint, set_rng_state
from .config import Recipe, RecipeError, recipe_to_dict
from .data import PromptSampler, check_columns
from .evaluation import evaluate_policy
from .logprobs import token_logprobs, token_logprobs_and_entropy
from .logs import MetricsLogger
from .losses import policy_loss, truncated_is_weights
from .rollout import SamplingParams
from .rollout.episodes import generate_episodes
from .templates import encode_prompt, render_prompt


def rollout_seed(seed: int, step: int, round_: int, row: int) -> int:
    """The sampling seed of one prompt's group: from the step, the dynamic-sampling round and the prompt's row,
    never the rank, so a group samples the same completions whichever rank (of how many) generates it."""
    return ((seed * 1_000_003 + step) * 1_009 + round_) * 1_000_003 + row


class CompletionLogprobs(nn.Module):
    """The policy as the loss sees it: per-token log-probabilities [B, T] (and entropies, or None) of the
    completion tokens of a right-padded batch. The trainer's backward runs through this forward, so this
    is the module DDP and FSDP wrap (FSDP's hooks need the LM head used inside a forward)."""

    def __init__(self, model: CausalLM, recipe: Recipe):
        super().__init__()
        self.model, self.recipe = model, recipe

    def forward(self, ids: torch.Tensor, where: torch.Tensor, targets: torch.Tensor, entropy: bool = False,
                routing: torch.Tensor | None = None, token_index: torch.Tensor | None = None):
        """ids [B, L] prompt + completion; where [B, T] the position predicting completion token t;
        targets [B, T] the completion tokens; routing [B, L, M, K] the experts to replay, or None;
        token_index [N] the flat positions of the real tokens (the feed-forward skips the padding)."""
        m, temperature = self.model, self.recipe.sampling.temperature
        with compute_precision(self.recipe, m):
            hidden = m.final_norm(m.hidden_states(ids, routing=routing, token_index=token_index))  # [B, L, D]
            h = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, D]
            if entropy:
                lp, ent = token_logprobs_and_entropy(h, m.lm_head.weight, targets, temperature)
            else:
                lp, ent = token_logprobs(h, m.lm_head.weight, targets, temperature), None
        # Fresh tensors, not views: FSDP hooks its backward onto the outputs, which an in-place op on a
        # view would silently drop (and it warns about views).
        return lp.clone(), ent.clone() if ent is not None else None


# ----- the trainer ------------------------------------------------------------------------------------------
class GRPOTrainer:
    """device: where this rank's models live; default the recipe's `device` as `resolve_device` reads it for
    this process (cuda:LOCAL_RANK under torchrun), which is what `grpo train` passes."""

    def __init__(self, recipe: Recipe, resume: bool = False, world_rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        self.started = time.perf_counter()  # time/elapsed_s counts from here: setup included, like a peer's wall time
        self.recipe = recipe
        self.rank, self.world_size = world_rank, world_size
        if device is None:
            device = resolve_device(recipe.device, distributed.world_from_env().local_rank, world_size)
        self.device = device
        self.out = Path(recipe.output_dir)
        torch.manual_seed(recipe.seed)
        self.tokenizer = build_tokenizer(recipe)
        d = recipe.data
        rows = build_rows(recipe)
        check_columns(rows, ["prompt"], d.source)
        self.rewards = build_rewards(recipe)
        self.toolbox = build_toolbox(recipe)  # None: single-turn completions
        self.tool_wall_s = 0.0  # this step's wall time waiting for tools
        self.tool_steps_beside = 0  # tools.overlap: this step's engine steps taken while a call was out
        self.prompt_text = [render_prompt(row, d.template, self.tokenizer) for row in rows]
        self.prompt_tokens = [self._encode(t) for t in self.prompt_text]
        self.rows = rows
        self.eval_rows: list[dict[str, Any]] = []
        if recipe.logging.eval_steps > 0:
            self.eval_rows = load_eval_rows(d, seed=recipe.seed)
            self.prompt_tokens_eval = [self._encode(render_prompt(r, d.template, self.tokenizer)) for r in self.eval_rows]
        self.policy = build_policy(recipe, self.tokenizer, self.device)
        self._check_context()
        self.policy.model.gradient_checkpointing = recipe.optim.gradient_checkpointing
        self.policy.set_moe_balancing(track_load=recipe.algorithm.router_bias_update_speed > 0)
        # GRPO puts no loss on the MTP heads: frozen, so DDP waits for no gradient of theirs.
        self.policy.mtp.requires_grad_(False)
        state = self._load_checkpoint() if resume else None
        self.reference = None
        if recipe.algorithm.beta > 0:
            self.reference = build_reference(self.policy)
            if state is not None and "reference" in state:
                self.reference.load_state_dict(state["reference"])
        if recipe.optim.compile:
            for model in (self.policy, self.reference):
                if model is not None:
                    model.compile_blocks()
        self._wrap(recipe.parallel if world_size > 1 else None)
        # Built after wrapping: FSDP replaces the parameters by their shards. (Checkpoints keep the keys
        # "scheduler" and "sampler" for these two.)
        self.optimizer, self.lr_schedule = build_optimizer(
            recipe, self.policy, fused=not (world_size > 1 and recipe.parallel == "fsdp"))
        self.prompt_sampler = PromptSampler(len(rows), recipe.prompts_per_step, seed=recipe.seed, rank=world_rank,
                                     world_size=world_size)
        self.step = 0
        if state is not None:
            self._restore(state)
        self.engine = build_rollout_engine(recipe, self.rollout_policy, self.tokenizer, rank=world_rank)

    def _wrap(self, parallel: str | None) -> None:
        """Sets up the three views of the policy:
        train_model     what the loss's backward runs through: DDP / FSDP over the ranks, or plain;
        rollout_policy  whole weights on this rank, for rollouts, old log-probs, evaluation and checkpoints:
                        the policy itself, except under FSDP, whose sharded forward is a collective (ranks
                        generating different lengths would deadlock): there an unsharded copy that receives
                        the full weights after every optimizer step (`_sync_rollout_policy`)."""
        self.rollout_policy = self.policy
        if parallel is not None and not distributed.is_distributed():
            raise RecipeError(f"world_size {self.world_size} needs a process group: launch with torchrun")
        if parallel == "fsdp":
            self.rollout_policy = copy.deepcopy(self.policy)
        module = CompletionLogprobs(self.policy, self.recipe)
        self.train_model = distributed.wrap(module, parallel, self.policy.layers) if parallel else module
        self.old_model = CompletionLogprobs(self.rollout_policy, self.recipe)
        self.reference_model = CompletionLogprobs(self.reference, self.recipe) if self.reference else None

    def _sync_rollout_policy(self) -> None:
        if self.rollout_policy is not self.policy:
            self.rollout_policy.load_state_dict(distributed.full_state_dict(self.policy))

    def _encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.recipe.data.template)

    def _check_context(self) -> None:
        limit = self.policy.config.max_position_embeddings
        budget = limit - self.recipe.sampling.max_completion_length
        for i, ids in enumerate(self.prompt_tokens + getattr(self, 'prompt_tokens_eval', [])):
            if len(ids) > budget:
                raise RecipeError(
                    f"data: prompt {i} is {len(ids)} tokens; with sampling.max_completion_length "
                    f"{self.recipe.sampling.max_completion_length} it exceeds the model's context of {limit}")

    def _load_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint's weights into the (not yet sharded) policy; returns the rest of its state.
        Every rank reads the files, whatever the number of ranks that wrote them."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise RecipeError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}")
        dtype = next(self.policy.parameters()).dtype
        loaded = load_pretrained(ckpt / "model", dtype=dtype, device=self.device)
        self.policy.load_state_dict(loaded.state_dict())
        return load_state(ckpt)

    def _restore(self, state: dict[str, Any]) -> None:
        distributed.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        self.lr_schedule.load_state_dict(state["scheduler"])
        self.prompt_sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]

    # ----- one step ---------------------------------------------------------------------------------------------
    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        s = self.recipe.sampling
        return SamplingParams(n=s.num_generations, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              min_p=s.min_p, max_tokens=s.max_completion_length, stop=list(s.stop), seed=seed)

    def rollout(self, indices: list[int], round_: int = 0) -> Rollout:
        G = self.recipe.sampling.num_generations
        # A seed per group, from its row and the step: a resumed run samples exactly what the uninterrupted
        # one did, and a group samples the same completions on any rank of any number of ranks.
        params = [self.sampling_params(rollout_seed(self.recipe.seed, self.step, round_, i)) for i in indices]
        prompts_ids = [self.prompt_tokens[i] for i in indices]
        if self.toolbox is None:
            outputs = self.engine.generate(prompts_ids, params)
        else:
            outputs, tool_stats = generate_episodes(self.engine, prompts_ids, params, self.toolbox,
                                                    self.recipe.tools.max_tool_calls, overlap=self.recipe.tools.overlap)
            self.tool_wall_s += tool_stats["tool_seconds"]
            self.tool_steps_beside += tool_stats["steps_beside_tools"]
        completions = [c for o in outputs for c in o.completions]
        calls = [getattr(c, "tool_calls", []) for c in completions]
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        prompts = [self.prompt_text[i] for i in indices for _ in range(G)]
        columns: dict[str, list[Any]] = {}
        for key in self.rows[indices[0]]:
            if key != "prompt":
                columns[key] = [self.rows[i].get(key) for i in indices for _ in range(G)]
        if self.toolbox is not None:  # each completion's calls: name, arguments, output, error, seconds
            columns["tool_calls"] = calls
        scores = self.rewards(prompts, texts, completion_ids=[c.token_ids for c in completions], **columns)
        return Rollout(
            prompt_ids=[self.prompt_tokens[i] for i in indices for _ in range(G)],
            completion_ids=[c.token_ids for c in completions], rollout_logprobs=[c.logprobs for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            rewards=torch.tensor(scores.total, dtype=torch.float32), per_function=scores.per_function,
            texts=texts, prompts=prompts, routing=[c.routed_experts for c in completions],
            tool_masks=[getattr(c, "tool_mask", None) for c in completions], tool_calls=[len(k) for k in calls],
            tool_errors=[sum(bool(x["error"]) for x in k) for k in calls],
            tool_seconds=[sum(x["seconds"] for x in k) for k in calls])

    def collect(self) -> tuple[Rollout, dict[str, float]]:
        """This rank's rollouts for this step; with dynamic sampling (DAPO), groups whose rewards are all equal
        are dropped and replaced by groups from further prompts, up to max_sampling_rounds. Each rank refills
        its own share; the ranks draw further batches from the sampler together, until none is short (a
        rank already full skips generating), so their samplers stay in step."""
        a, G = self.recipe.algorithm, self.recipe.sampling.num_generations
        indices = self.prompt_sampler.next_indices()
        ro = self.rollout(indices)
        if not a.dynamic_sampling:
            return ro, {}
        want = len(indices)
        kept = [ro.select_groups(ro.groups_with_signal(G), G)]
        rounds = 1
        while rounds < a.max_sampling_rounds:
            short = sum(len(k.completion_ids) for k in kept) // G < want
            if not distributed.any_rank(short):
                break
            more = self.prompt_sampler.next_indices()
            if short:
                ro_more = self.rollout(more, rounds)
                kept.append(ro_more.select_groups(ro_more.groups_with_signal(G), G))
            rounds += 1
        result = Rollout.concat(kept)
        groups = len(result.completion_ids) // G
        stats = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/groups": float(min(groups, want))}
        if groups == 0:
            return ro, stats  # no group has signal: the gradient is zero either way
        return (result.select_groups(list(range(want)), G) if groups > want else result), stats

    def micro_batches(self, ro: Rollout) -> list[dict[str, torch.Tensor]]:
        """`ro` cut into padded micro-batches of optim.micro_batch_size completions."""
        n, mb, a = len(ro.completion_ids), self.recipe.optim.micro_batch_size, self.recipe.algorithm
        return [ro.micro_batch(list(range(s, min(s + mb, n))), a.mask_truncated_completions, a.routing_replay,
                               self.device) for s in range(0, n, mb)]

    def _empty_batch(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """A one-row micro-batch that counts no token: no loss, zero gradients."""
        a = self.recipe.algorithm
        b = ro.micro_batch([0], a.mask_truncated_completions, a.routing_replay, self.device)
        b["mask"].zero_()
        b["advantages"] = torch.zeros(1, device=self.device)
        return b

    def completion_logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor], entropy: bool = False,
                            replay: bool = True):
        """Per-token log-probabilities [B, T] (and entropy) of the completions; `model` a CompletionLogprobs
        (possibly wrapped by DDP or FSDP) or a plain CausalLM.
        replay: route each token to the experts the rollout used, when the batch carries them."""
        if isinstance(model, CausalLM):
            model = CompletionLogprobs(model, self.recipe)
        routing = batch.get("routing") if replay else None
        return model(batch["ids"], batch["where"], batch["targets"], entropy, routing, batch.get("token_index"))

    # ----- one step, phase by phase -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One GRPO step: collect (generate and score), advantages over the global batch, old and reference
        log-probs, the policy update (with the router bias and the weight push), metrics."""
        t0 = time.perf_counter()
        self.tool_wall_s = 0.0
        self.tool_steps_beside = 0
        ro, stats = self.collect()
        t_rollout = time.perf_counter() - t0
        batch = self.global_batch(ro, stats)
        t1 = time.perf_counter()
        old, ref = self.old_and_reference_logprobs(batch.micro_batches)
        t_ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        sums, grad_norm = self.update(batch, old, ref)
        self.after_update()
        t_update = time.perf_counter() - t2
        self.step += 1
        times = {"time/rollout_s": t_rollout, "time/ref_old_logprobs_s": t_ref, "time/update_s": t_update}
        if self.toolbox is not None:
            times["time/tools_s"] = self.tool_wall_s
            if self.recipe.tools.overlap:
                times["tools/steps_beside_calls"] = self.tool_steps_beside
        self._last_rollout = ro
        return self.step_metrics(batch, stats, sums, grad_norm, times, t0)

    def global_batch(self, ro: Rollout, stats: dict[str, float]) -> GlobalBatch:
        """This rank's micro-batches with their advantages. The ranks exchange a few numbers per completion:
        the advantages (scale_rewards="batch" takes the batch's std), the loss normalizers and the logged
        statistics are those of the GLOBAL batch."""
        G, mb = self.recipe.sampling.num_generations, self.recipe.optim.micro_batch_size
        n = len(ro.completion_ids)
        batches = self.micro_batches(ro)
        shares = distributed.all_gather_objects(
            RolloutStats.of(ro, tokens=sum(int(b["mask"].sum()) for b in batches), stats=stats))
        everyone = RolloutStats.concat(shares)
        offset = sum(len(x.lengths) for x in shares[: self.rank])
        adv = group_advantages(everyone.rewards, G, scale_rewards=self.recipe.algorithm.scale_rewards)
        # The rewards come from Python on the host (and are what the ranks exchange); this rank's advantages
        # go to the policy's device in one copy.
        advantages = adv.advantages.view(-1)[offset:offset + n].to(self.device)
        for s, b in zip(range(0, n, mb), batches):
            b["advantages"] = advantages[s:s + len(b["ids"])]
        # DDP and FSDP need as many forward/backward passes on every rank; a rank with fewer groups (dynamic
        # sampling) adds micro-batches that count no token.
        num_real = len(batches)
        batches += [self._empty_batch(ro) for _ in range(max(math.ceil(len(x.lengths) / mb) for x in shares) - num_real)]
        return GlobalBatch(batches, num_real, everyone, shares, adv)

    @torch.no_grad()
    def old_and_reference_logprobs(self, batches: list[dict[str, torch.Tensor]]):
        """Per micro-batch: the old policy's log-probs (needed when one generation feeds several updates, or
        to correct the rollout; else None) and the reference's (when there is one; else None)."""
        a = self.recipe.algorithm
        need_old = a.num_iterations > 1 or a.rollout_is_cap is not None
        old = [self.completion_logprobs(self.old_model, b)[0] for b in batches] if need_old else None
        ref = [self.completion_logprobs(self.reference_model, b, replay=False)[0] for b in batches] \
            if self.reference_model else None
        return old, ref

    def update(self, batch: GlobalBatch, old, ref) -> tuple[dict[str, float], float]:
        """num_iterations optimizer steps over the micro-batches; returns the summed loss statistics (summed
        over the ranks) and the last gradient norm."""
        a = self.recipe.algorithm
        sums: dict[str, float] = {"loss": 0.0, "batches": 0.0, "mismatch": 0.0, "mismatch_tokens": 0.0}
        self.train_model.train()
        grad_norm = 0.0
        for iteration in range(a.num_iterations):
            for j, b in enumerate(batch.micro_batches):
                with distributed.gradient_sync(self.train_model, enabled=j == len(batch.micro_batches) - 1):
                    loss, metrics = self.micro_batch_loss(b, old[j] if old is not None else None,
                                                          ref[j] if ref is not None else None, batch,
                                                          sums if iteration == 0 else None)
                    (loss * distributed.loss_scale()).backward()
                weight = float(b["mask"].sum())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
                sums["loss"] += float(loss.detach())
                sums["batches"] += float(j < batch.num_real)
            grad_norm = distributed.clip_grad_norm(self.policy.parameters(), self.recipe.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return distributed.all_reduce_sums(sums), grad_norm

    def micro_batch_loss(self, b: dict[str, torch.Tensor], old_lp: torch.Tensor | None, ref_lp: torch.Tensor | None,
                         batch: GlobalBatch, mismatch: dict[str, float] | None):
        """The policy loss of one micro-batch (`policy_loss`, normalized by the global batch's counts).
        mismatch: where to add the rollout/trainer log-prob mismatch (logged once per generation), or None."""
        a = self.recipe.algorithm
        lp, ent = self.completion_logprobs(self.train_model, b, entropy=a.entropy_coef != 0)
        old_lp = old_lp if old_lp is not None else lp.detach()
        if mismatch is not None:
            diff = (old_lp - b["rollout_logprobs"]).abs() * b["mask"]
            mismatch["mismatch"] += float(diff.sum())
            mismatch["mismatch_tokens"] += int(b["mask"].sum())
        is_w = truncated_is_weights(old_lp, b["rollout_logprobs"], a.rollout_is_cap) \
            if a.rollout_is_cap is not None else None
        return policy_loss(
            lp, old_lp, b["advantages"], b["mask"], loss_type=a.loss_type,
            epsilon=a.epsilon, epsilon_high=a.epsilon_high, importance_sampling_level=a.importance_sampling_level,
            ref_logprobs=ref_lp, beta=a.beta, kl_estimator=a.kl_estimator,
            num_items_in_batch=max(batch.everyone.tokens, 1), num_sequences_in_batch=len(batch.everyone.lengths),
            max_completion_length=self.recipe.sampling.max_completion_length, entropy=ent,
            entropy_coef=a.entropy_coef, rollout_is_weights=is_w)

    def after_update(self) -> None:
        """The LR schedule's step, the router bias (aux-loss-free balancing), the rollout engine's weights."""
        self.lr_schedule.step()
        speed = self.recipe.algorithm.router_bias_update_speed
        if speed > 0:
            self._update_router_bias(speed)
        self._sync_rollout_policy()
        self.engine.update_weights(self.rollout_policy)  # a no-op for our engine, which runs the model itself

    def step_metrics(self, batch: GlobalBatch, stats: dict[str, float], sums: dict[str, float], grad_norm: float,
                     times: dict[str, float], t0: float) -> dict[str, Any]:
        """The step's logged metrics (TRL's names), all over the global batch."""
        everyone, a = batch.everyone, self.recipe.algorithm
        denom = max(everyone.tokens * a.num_iterations, 1)
        lengths = torch.tensor(everyone.lengths, dtype=torch.float32)
        N = len(everyone.lengths)
        if "dynamic_sampling/groups" in stats:
            stats["dynamic_sampling/groups"] = sum(x.stats["dynamic_sampling/groups"] for x in batch.shares)
        return {
            "step": self.step,
            "reward": float(everyone.rewards.mean()) if N else 0.0,
            "reward_std": float(everyone.rewards.std()) if N > 1 else 0.0,
            **{f"rewards/{k}/mean": _mean(v) for k, v in everyone.per_function.items()},
            "frac_reward_zero_std": float(batch.advantages.metrics["frac_reward_zero_std"]),
            "completions/mean_length": float(lengths.mean()) if N else 0.0,
            "completions/max_length": float(lengths.max()) if N else 0.0,
            "completions/clipped_ratio": sum(everyone.truncated) / max(N, 1),
            "loss": sums.pop("loss") / max(sums.pop("batches"), 1),
            "rollout/logprob_abs_diff": sums.pop("mismatch") / max(sums.pop("mismatch_tokens"), 1),
            **{k: v / denom for k, v in sums.items()},
            "grad_norm": grad_norm,
            "learning_rate": self.lr_schedule.get_last_lr()[0],
            **times,
            "time/step_s": time.perf_counter() - t0,
            "time/elapsed_s": time.perf_counter() - self.started,
            "tokens_per_s": float(lengths.sum()) / max(time.perf_counter() - t0, 1e-9),
            **stats,
            **(tool_metrics(everyone) if self.toolbox is not None else {}),
        }

    def _update_router_bias(self, speed: float) -> None:
        """The aux-loss-free update from the whole global batch's expert loads: each rank's counts (rollouts,
        old log-probs and training passes, as in one process, also when the rollout copy ran some of them)
        summed over the ranks, so every rank moves its bias the same way."""
        for mine, rollout_copy in zip(self.policy.moe_layers(), self.rollout_policy.moe_layers()):
            if rollout_copy is not mine:
                mine.expert_load += rollout_copy.expert_load
                rollout_copy.expert_load.zero_()
            distributed.all_reduce_(mine.expert_load)
        self.policy.update_router_bias(speed)

    # ----- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        r = self.recipe
        logger = None
        if self.rank == 0:  # one process writes the run's files
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(recipe_to_dict(r), indent=2, default=str))
            logger = MetricsLogger(self.out, r.logging.tensorboard, start_step=self.step)
        history = []
        bar = tqdm(total=r.max_steps, initial=self.step, desc="grpo", disable=not r.logging.progress_bar or self.rank)
        while self.step < r.max_steps:
            metrics = self.train_step()
            due = r.logging.eval_steps and (self.step % r.logging.eval_steps == 0 or self.step == r.max_steps)
            if due and self.rank == 0:  # the others go on and wait for it at the next step's exchange
                metrics.update(self.evaluate())
            history.append(metrics)
            if logger is not None:
                if self.step % r.logging.log_every == 0:
                    logger.log(metrics)
                    logger.log_completions(self.step, self._last_rollout, r.logging.completions_per_step)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", len=f"{metrics['completions/mean_length']:.0f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if self.step % r.logging.save_every == 0 or self.step == r.max_steps:
                self.save()
        bar.close()
        if logger is not None:
            logger.close()
        return history

    def evaluate(self) -> dict[str, float]:
        """Greedy pass@1 and format compliance on the held-out rows, graded like the rewards grade."""
        # An engine with its own copy of the weights (vLLM) is left to rollouts: ours evaluates the policy itself.
        engine = self.engine if self.engine.runs_model_in_place else build_engine(
            self.rollout_policy, self.tokenizer, dataclasses.replace(self.recipe.rollout, backend="ours"),
            seed=self.recipe.seed)
        return evaluate_policy(self.rollout_policy, self.tokenizer, self.eval_rows, self.recipe.data.template, engine=engine,
                               max_tokens=self.recipe.sampling.max_completion_length, seed=self.recipe.seed,
                               toolbox=self.toolbox, max_tool_calls=self.recipe.tools.max_tool_calls)

    def save(self) -> Path | None:
        """Rank 0 writes one checkpoint: the whole weights in HF format (the rollout policy holds them, also
        under FSDP) and the optimizer state whole and keyed by parameter name, so that any number of ranks can
        resume. Every rank takes part in gathering the optimizer state; the others wait until it is written."""
        optimizer = distributed.optimizer_state(self.policy, self.optimizer)
        path = None
        if self.rank == 0:
            state = {"optimizer": optimizer, "scheduler": self.lr_schedule.state_dict(),
                     "sampler": self.prompt_sampler.state_dict()}
            if self.reference is not None:
                state["reference"] = self.reference.state_dict()
            path = save_checkpoint(self.out, self.step, self.rollout_policy, self.tokenizer, state,
                                   self.recipe.logging.keep_last)
        distributed.barrier()
        return path


@dataclass
class GlobalBatch:
    """One step's batch as this rank trains on it: its micro-batches (with their advantages, padded with
    empty ones to the ranks' common count) and what the step needs of the global batch."""

    micro_batches: list[dict[str, torch.Tensor]]
    num_real: int  # the micro-batches that hold completions (the rest count no token)
    everyone: RolloutStats  # the global batch, all ranks
    shares: list[RolloutStats]  # each rank's part
    advantages: GroupAdvantages  # of the global batch


def tool_metrics(everyone: RolloutStats) -> dict[str, float]:
    """Tool use over the global batch: calls per completion, the share of completions that call, failed calls
    (errors, timeouts, malformed calls), the seconds the calls ran, summed, and the tool-output tokens per
    completion (part of completions/mean_length, though the loss skips them)."""
    n = max(len(everyone.tool_calls), 1)
    calls = sum(everyone.tool_calls)
    return {"tools/calls_per_completion": calls / n,
            "tools/call_frequency": sum(c > 0 for c in everyone.tool_calls) / n,
            "tools/errors": float(sum(everyone.tool_errors)),
            "tools/failure_frequency": sum(everyone.tool_errors) / max(calls, 1),
            "tools/call_seconds": float(sum(everyone.tool_seconds)),
            "tools/output_tokens_per_completion": sum(everyone.tool_tokens) / n}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
