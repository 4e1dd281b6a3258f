"""Cold-start SFT: next-token cross-entropy on completion tokens only (optionally plus the MTP loss), with
the same model, checkpoint format and logging as GRPO. With tools, the tool outputs written in a trace are
tokenized as an episode appends them and are no target."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .build import (
    adamw,
    build_policy,
    build_rows,
    build_tokenizer,
    build_toolbox,
    compute_precision,
    lr_schedule,
    resolve_device,
)
from .config import Recipe, RecipeError
from .data import check_columns
from .logs import MetricsLogger
from .templates import render_prompt
from .tools import split_tool_output


def r1_completion(row: dict[str, Any]) -> str:
    """The R1 format of a row with `reasoning` and `answer`."""
    return f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>"


class SFTTrainer:
    """device: where the model trains; default the recipe's `device` (`resolve_device`)."""

    def __init__(self, recipe: Recipe, device: torch.device | None = None):
        self.recipe = recipe
        self.device = resolve_device(recipe.device) if device is None else device
        s = recipe.sft
        torch.manual_seed(recipe.seed)
        self.out = Path(s.output_dir or Path(recipe.output_dir) / "sft")
        self.tokenizer = build_tokenizer(recipe)
        d = recipe.data
        rows = build_rows(recipe)
        if rows and s.completion_column not in rows[0]:
            check_columns(rows, ["prompt", "reasoning", "answer"], d.source)
        else:
            check_columns(rows, ["prompt", s.completion_column], d.source)
        toolbox = build_toolbox(recipe)  # with tools, their outputs in the traces are input, not targets
        self.tool_syntaxes = toolbox.syntaxes if toolbox is not None else []
        self.model = build_policy(recipe, self.tokenizer, self.device)
        if recipe.optim.compile:
            self.model.compile_blocks()
        if s.mtp_weight > 0 and not len(self.model.mtp):
            raise RecipeError("sft.mtp_weight > 0 needs MTP modules: set model.mtp (from scratch) or a checkpoint with them")
        self.examples = [self._encode(row) for row in rows]
        limit = self.model.config.max_position_embeddings
        for i, (ids, _, _) in enumerate(self.examples):
            if len(ids) > limit:
                raise RecipeError(f"data: example {i} is {len(ids)} tokens, beyond the model's context of {limit}")
        self.optimizer = adamw(self.model.parameters(), s.lr, recipe.optim.betas, recipe.optim.weight_decay)
        self.lr_schedule = lr_schedule(self.optimizer, s.warmup_steps, s.steps, s.schedule)
        self.generator = torch.Generator().manual_seed(recipe.seed)

    def _encode(self, row: dict[str, Any]) -> tuple[list[int], int, list[int]]:
        """-> (prompt + completion + EOS token ids, prompt length, the positions of tool output). With tools,
        each tool output in the completion is tokenized on its own, as an episode appends it."""
        s, tok = self.recipe.sft, self.tokenizer
        prompt = render_prompt(row, self.recipe.data.template, tok)
        completion = row[s.completion_column] if s.completion_column in row else r1_completion(row)
        p = tok(prompt, add_special_tokens=False).input_ids
        if tok.bos_token_id is not None and (not p or p[0] != tok.bos_token_id) and self.recipe.data.template != "chat":
            p = [tok.bos_token_id, *p]
        c: list[int] = []
        tool: list[int] = []
        pieces = split_tool_output(completion, self.tool_syntaxes) if self.tool_syntaxes else [(False, completion)]
        for is_tool, piece in pieces:
            ids = tok(piece, add_special_tokens=False).input_ids
            if is_tool:
                tool += range(len(p) + len(c), len(p) + len(c) + len(ids))
            c += ids
        return p + c + [tok.eos_token_id], len(p), tool

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch on the model's device: ids [B, L] right-padded, loss mask [B, L] over completion
        targets. Drawn by a CPU generator and filled on the host (one copy each to the device), so a seed
        picks the same examples on any device."""
        pick = torch.randint(len(self.examples), (self.recipe.sft.batch_size,), generator=self.generator).tolist()
        L = max(len(self.examples[i][0]) for i in pick)
        ids = torch.zeros(len(pick), L, dtype=torch.long)
        mask = torch.zeros(len(pick), L, dtype=torch.bool)
        for b, i in enumerate(pick):
            seq, p, tool = self.examples[i]
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, p: len(seq)] = True  # targets: the completion and its EOS, not the tools' output
            mask[b, tool] = False
        return ids.to(self.device), mask.to(self.device)

    def train(self) -> list[dict[str, float]]:
        s = self.recipe.sft
        self.out.mkdir(parents=True, exist_ok=True)
        logger = MetricsLogger(self.out, self.recipe.logging.tensorboard)
        history = []
        bar = tqdm(range(s.steps), desc="sft", disable=not self.recipe.logging.progress_bar)
        self.model.train()
        for step in bar:
            t0 = time.perf_counter()
            ids, mask = self.batch()
            with compute_precision(self.recipe, self.model):
                hidden = self.model.hidden_states(ids)
                logits = self.model.logits(hidden)
            target_mask = mask[:, 1:]
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                 reduction="none").view_as(target_mask)
            loss = (ce * target_mask).sum() / target_mask.sum()
            metrics = {"step": step + 1, "loss": float(loss.detach())}
            if s.mtp_weight > 0:
                mtp = self.model.mtp_loss(hidden, ids, mask)
                loss = loss + s.mtp_weight * mtp
                metrics["mtp_loss"] = float(mtp.detach())
            loss.backward()
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.max_grad_norm))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_schedule.step()
            metrics["learning_rate"] = self.lr_schedule.get_last_lr()[0]
            metrics["time/step_s"] = time.perf_counter() - t0
            history.append(metrics)
            logger.log(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        logger.close()
        self.model.save_pretrained(self.out / "model")
        self.tokenizer.save_pretrained(self.out / "model")
        (self.out / "summary.json").write_text(json.dumps({"steps": s.steps, "final_loss": history[-1]["loss"] if history else None}))
        return history
