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
from .advantages import group_advantages
from .build import (
    build_engine,
    build_optimizer,
    build_policy,
    build_reference,
    build_rewards,
    build_rollout_engine,
    build_rows,
    build_tokenizer,
    compute_precision,
)
from .checkpointing import latest_checkpoint, load_state, save_checkpoint, set_rng_state
from .config import Recipe, RecipeError, recipe_to_dict
from .data import PromptSampler, check_columns
from .evaluation import encode_prompt, evaluate_policy, load_eval_rows
from .logprobs import token_logprobs, token_logprobs_and_entropy
from .logs import MetricsLogger
from .losses import policy_loss, truncated_is_weights
from .rollout import SamplingParams
from .templates import render_prompt


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
            hidden = m.model.norm(m.hidden_states(ids, routing=routing, token_index=token_index))  # [B, L, D]
            h = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, D]
            if entropy:
                lp, ent = token_logprobs_and_entropy(h, m.lm_head.weight, targets, temperature)
            else:
                lp, ent = token_logprobs(h, m.lm_head.weight, targets, temperature), None
        # Fresh tensors, not views: FSDP hooks its backward onto the outputs, which an in-place op on a
        # view would silently drop (and it warns about views).
        return lp.clone(), ent.clone() if ent is not None else None


@dataclass
class Rollout:
    """One step's generations, flattened group by group: P prompts x G completions."""

    prompt_ids: list[list[int]]  # [P*G]
    completion_ids: list[list[int]]  # [P*G]
    rollout_logprobs: list[list[float]]  # [P*G]
    finish_reasons: list[str]
    rewards: torch.Tensor  # [P*G] weighted total
    per_function: dict[str, list[float | None]]
    texts: list[str]
    prompts: list[str]
    routing: list[torch.Tensor | None]  # [P*G] each [prompt + completion - 1, M, K] with routing replay, else None


@dataclass
class RolloutStats:
    """What the ranks exchange about their rollouts each step: a few numbers per completion, in order."""

    rewards: torch.Tensor  # [n]
    per_function: dict[str, list[float | None]]  # each [n]
    lengths: list[int]  # [n] completion tokens
    truncated: list[bool]  # [n] stopped by max_completion_length
    tokens: int  # the tokens the loss counts (truncated ones masked out when asked)
    stats: dict[str, float]  # dynamic sampling's

    @staticmethod
    def of(ro: Rollout, tokens: int, stats: dict[str, float]) -> RolloutStats:
        return RolloutStats(ro.rewards, ro.per_function, [len(c) for c in ro.completion_ids],
                            [f == "length" for f in ro.finish_reasons], tokens, stats)

    @staticmethod
    def concat(parts: list[RolloutStats]) -> RolloutStats:
        """The global batch: the ranks' parts in rank order (the order of the sampler's global batch)."""
        if len(parts) == 1:
            return parts[0]
        return RolloutStats(torch.cat([p.rewards for p in parts]),
                            {k: [x for p in parts for x in p.per_function[k]] for k in parts[0].per_function},
                            [x for p in parts for x in p.lengths], [x for p in parts for x in p.truncated],
                            sum(p.tokens for p in parts), {})


# ----- the trainer ------------------------------------------------------------------------------------------
class GRPOTrainer:
    def __init__(self, recipe: Recipe, resume: bool = False, world_rank: int = 0, world_size: int = 1):
        self.started = time.perf_counter()  # time/elapsed_s counts from here: setup included, like a peer's wall time
        self.recipe = recipe
        self.rank, self.world_size = world_rank, world_size
        self.out = Path(recipe.output_dir)
        torch.manual_seed(recipe.seed)
        self.tokenizer = build_tokenizer(recipe)
        d = recipe.data
        rows = build_rows(recipe)
        check_columns(rows, ["prompt"], d.source)
        self.rewards = build_rewards(recipe)
        self.prompt_text = [render_prompt(row, d.template, self.tokenizer) for row in rows]
        self.prompt_tokens = [self._encode(t) for t in self.prompt_text]
        self.rows = rows
        self.eval_rows: list[dict[str, Any]] = []
        if recipe.logging.eval_steps > 0:
            self.eval_rows = load_eval_rows(d, seed=recipe.seed)
            self.prompt_tokens_eval = [self._encode(render_prompt(r, d.template, self.tokenizer)) for r in self.eval_rows]
        self.policy = build_policy(recipe, self.tokenizer)
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
        self.train_model = distributed.wrap(module, parallel, self.policy.model.layers) if parallel else module
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
        loaded = load_pretrained(ckpt / "model", dtype=dtype)
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
        outputs = self.engine.generate([self.prompt_tokens[i] for i in indices], params)
        completions = [c for o in outputs for c in o.completions]
        texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
        prompts = [self.prompt_text[i] for i in indices for _ in range(G)]
        columns: dict[str, list[Any]] = {}
        for key in self.rows[indices[0]]:
            if key != "prompt":
                columns[key] = [self.rows[i].get(key) for i in indices for _ in range(G)]
        scores = self.rewards(prompts, texts, completion_ids=[c.token_ids for c in completions], **columns)
        return Rollout(
            prompt_ids=[self.prompt_tokens[i] for i in indices for _ in range(G)],
            completion_ids=[c.token_ids for c in completions], rollout_logprobs=[c.logprobs for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            rewards=torch.tensor(scores.total, dtype=torch.float32), per_function=scores.per_function,
            texts=texts, prompts=prompts, routing=[c.routed_experts for c in completions])

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
        kept = [self._select_groups(ro, self._groups_with_signal(ro))]
        rounds = 1
        while rounds < a.max_sampling_rounds:
            short = sum(len(k.completion_ids) for k in kept) // G < want
            if not distributed.any_rank(short):
                break
            more = self.prompt_sampler.next_indices()
            if short:
                ro_more = self.rollout(more, rounds)
                kept.append(self._select_groups(ro_more, self._groups_with_signal(ro_more)))
            rounds += 1
        result = _concat_rollouts(kept)
        groups = len(result.completion_ids) // G
        stats = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/groups": float(min(groups, want))}
        if groups == 0:
            return ro, stats  # no group has signal: the gradient is zero either way
        return (self._select_groups(result, list(range(want))) if groups > want else result), stats

    def _groups_with_signal(self, ro: Rollout) -> list[int]:
        G = self.recipe.sampling.num_generations
        r = ro.rewards.view(-1, G)
        return [g for g in range(r.shape[0]) if (r[g] != r[g, 0]).any()]

    def _select_groups(self, ro: Rollout, groups: list[int]) -> Rollout:
        G = self.recipe.sampling.num_generations
        idx = [g * G + k for g in groups for k in range(G)]
        return Rollout([ro.prompt_ids[i] for i in idx], [ro.completion_ids[i] for i in idx],
                       [ro.rollout_logprobs[i] for i in idx], [ro.finish_reasons[i] for i in idx],
                       ro.rewards[idx] if idx else ro.rewards[:0],
                       {k: [v[i] for i in idx] for k, v in ro.per_function.items()},
                       [ro.texts[i] for i in idx], [ro.prompts[i] for i in idx], [ro.routing[i] for i in idx])

    def _batch(self, ro: Rollout, rows: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded sequences and the completion-aligned gather index for micro-batch `rows`."""
        seqs = [ro.prompt_ids[i] + ro.completion_ids[i] for i in rows]
        L = max(len(s) for s in seqs)
        T = max(len(ro.completion_ids[i]) for i in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        targets = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        where = torch.zeros(len(rows), T, dtype=torch.long)
        rollout_lp = torch.zeros(len(rows), T)
        # The real tokens' flat positions: the feed-forward layers skip the right padding (a fifth of the
        # tokens at 32 completion tokens, half at 128, where completions stop at EOS).
        token_index = torch.cat([b * L + torch.arange(len(s)) for b, s in enumerate(seqs)])
        for b, i in enumerate(rows):
            p, c = len(ro.prompt_ids[i]), len(ro.completion_ids[i])
            ids[b, : p + c] = torch.tensor(seqs[b])
            targets[b, :c] = torch.tensor(ro.completion_ids[i])
            mask[b, :c] = True
            where[b] = (p - 1 + torch.arange(T)).clamp(max=L - 1)  # the position that predicts token t
            rollout_lp[b, :c] = torch.tensor(ro.rollout_logprobs[i])
            if self.recipe.algorithm.mask_truncated_completions and ro.finish_reasons[i] == "length":
                mask[b] = False
        batch = {"ids": ids, "targets": targets, "mask": mask, "where": where, "rollout_logprobs": rollout_lp,
                 "token_index": token_index}
        if self.recipe.algorithm.routing_replay and ro.routing[rows[0]] is not None:
            _, M, K = ro.routing[rows[0]].shape
            routing = torch.full((len(rows), L, M, K), -1, dtype=torch.int16)  # -1: padding, the gate chooses
            for b, i in enumerate(rows):
                routing[b, : len(ro.routing[i])] = ro.routing[i]
            batch["routing"] = routing
        return batch

    def _empty_batch(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """A one-row micro-batch that counts no token: no loss, zero gradients."""
        b = self._batch(ro, [0])
        b["mask"].zero_()
        b["advantages"] = torch.zeros(1)
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

    def train_step(self) -> dict[str, float]:
        r, a = self.recipe, self.recipe.algorithm
        t0 = time.perf_counter()
        ro, stats = self.collect()
        t_rollout = time.perf_counter() - t0
        G = r.sampling.num_generations
        n = len(ro.completion_ids)
        mb = r.optim.micro_batch_size
        batches = [self._batch(ro, list(range(s, min(s + mb, n)))) for s in range(0, n, mb)]
        # The ranks exchange a few numbers per completion: the advantages (scale_rewards="batch" takes the
        # batch's std), the loss normalizers and the logged statistics are those of the GLOBAL batch.
        shares = distributed.all_gather_objects(
            RolloutStats.of(ro, tokens=sum(int(b["mask"].sum()) for b in batches), stats=stats))
        everyone = RolloutStats.concat(shares)
        offset = sum(len(x.lengths) for x in shares[: self.rank])
        adv = group_advantages(everyone.rewards, G, scale_rewards=a.scale_rewards)
        advantages = adv.advantages.view(-1)[offset:offset + n]
        for s, b in zip(range(0, n, mb), batches):
            b["advantages"] = advantages[s:s + len(b["ids"])]
        num_tokens, num_seqs = everyone.tokens, len(everyone.lengths)
        # DDP and FSDP need as many forward/backward passes on every rank; a rank with fewer groups (dynamic
        # sampling) adds micro-batches that count no token.
        num_real = len(batches)
        batches += [self._empty_batch(ro) for _ in range(max(math.ceil(len(x.lengths) / mb) for x in shares) - num_real)]
        t1 = time.perf_counter()
        # Old log-probs: needed when one generation feeds several updates, or to correct the rollout.
        need_old = a.num_iterations > 1 or a.rollout_is_cap is not None
        with torch.no_grad():
            old = [self.completion_logprobs(self.old_model, b)[0] for b in batches] if need_old else None
            ref = [self.completion_logprobs(self.reference_model, b, replay=False)[0] for b in batches] \
                if self.reference_model else None
        t_ref = time.perf_counter() - t1
        sums: dict[str, float] = {"loss": 0.0, "batches": 0.0, "mismatch": 0.0, "mismatch_tokens": 0.0}
        scale = distributed.loss_scale()
        self.train_model.train()
        t2 = time.perf_counter()
        grad_norm = 0.0
        for iteration in range(a.num_iterations):
            for j, b in enumerate(batches):
                with distributed.gradient_sync(self.train_model, enabled=j == len(batches) - 1):
                    lp, ent = self.completion_logprobs(self.train_model, b, entropy=a.entropy_coef != 0)
                    old_lp = old[j] if old is not None else lp.detach()
                    if iteration == 0:  # the mismatch is logged once per generation
                        diff = (old_lp - b["rollout_logprobs"]).abs() * b["mask"]
                        sums["mismatch"] += float(diff.sum())
                        sums["mismatch_tokens"] += int(b["mask"].sum())
                    is_w = truncated_is_weights(old_lp, b["rollout_logprobs"], a.rollout_is_cap) \
                        if a.rollout_is_cap is not None else None
                    loss, metrics = policy_loss(
                        lp, old_lp, b["advantages"], b["mask"], loss_type=a.loss_type,
                        epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                        importance_sampling_level=a.importance_sampling_level,
                        ref_logprobs=ref[j] if ref is not None else None, beta=a.beta, kl_estimator=a.kl_estimator,
                        num_items_in_batch=max(num_tokens, 1), num_sequences_in_batch=num_seqs,
                        max_completion_length=r.sampling.max_completion_length, entropy=ent,
                        entropy_coef=a.entropy_coef, rollout_is_weights=is_w)
                    (loss * scale).backward()
                weight = float(b["mask"].sum())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
                sums["loss"] += float(loss.detach())
                sums["batches"] += float(j < num_real)
            grad_norm = distributed.clip_grad_norm(self.policy.parameters(), r.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        if a.router_bias_update_speed > 0:
            self._update_router_bias(a.router_bias_update_speed)
        self._sync_rollout_policy()
        self.engine.update_weights(self.rollout_policy)  # a no-op for our engine, which runs the model itself
        t_update = time.perf_counter() - t2
        self.step += 1
        sums = distributed.all_reduce_sums(sums)
        denom = max(num_tokens * a.num_iterations, 1)
        lengths = torch.tensor(everyone.lengths, dtype=torch.float32)
        N = len(everyone.lengths)
        for key in ("dynamic_sampling/groups",):
            if key in stats:
                stats[key] = sum(x.stats[key] for x in shares)
        m = {
            "step": self.step,
            "reward": float(everyone.rewards.mean()) if N else 0.0,
            "reward_std": float(everyone.rewards.std()) if N > 1 else 0.0,
            **{f"rewards/{k}/mean": _mean(v) for k, v in everyone.per_function.items()},
            "frac_reward_zero_std": float(adv.metrics["frac_reward_zero_std"]),
            "completions/mean_length": float(lengths.mean()) if N else 0.0,
            "completions/max_length": float(lengths.max()) if N else 0.0,
            "completions/clipped_ratio": sum(everyone.truncated) / max(N, 1),
            "loss": sums.pop("loss") / max(sums.pop("batches"), 1),
            "rollout/logprob_abs_diff": sums.pop("mismatch") / max(sums.pop("mismatch_tokens"), 1),
            **{k: v / denom for k, v in sums.items()},
            "grad_norm": grad_norm,
            "learning_rate": self.lr_schedule.get_last_lr()[0],
            "time/rollout_s": t_rollout, "time/ref_old_logprobs_s": t_ref, "time/update_s": t_update,
            "time/step_s": time.perf_counter() - t0,
            "time/elapsed_s": time.perf_counter() - self.started,
            "tokens_per_s": float(lengths.sum()) / max(time.perf_counter() - t0, 1e-9),
            **stats,
        }
        self._last_rollout = ro
        return m

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
                               max_tokens=self.recipe.sampling.max_completion_length, seed=self.recipe.seed)

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


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _concat_rollouts(parts: list[Rollout]) -> Rollout:
    first = parts[0]
    return Rollout(
        [x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.completion_ids],
        [x for p in parts for x in p.rollout_logprobs], [x for p in parts for x in p.finish_reasons],
        torch.cat([p.rewards for p in parts]),
        {k: [x for p in parts for x in p.per_function[k]] for k in first.per_function},
        [x for p in parts for x in p.texts], [x for p in parts for x in p.prompts],
        [x for p in parts for x in p.routing])
