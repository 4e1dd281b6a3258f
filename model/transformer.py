"""The DeepSeek-V2/V3 decoder: embeddings, blocks of MLA + (dense MLP | DeepSeekMoE), the final norm, the
LM head, and the Multi-Token Prediction modules. Parameter names follow transformers' DeepseekV3, so
checkpoint I/O is a renaming of experts and MTP layers only."""

from __future__ import annotations

import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MLA
from .cache import CacheView, PagedCacheView
from .config import ModelConfig
from .hf_format import save_pretrained
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryTable, rope_matrices


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then h + FFN(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: CacheView | None = None, absorb: bool = False, routing: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; routing [B, T, K] replays the MoE layer's expert choice.
        token_index [N]: the flat positions (b * T + t) whose outputs matter; the feed-forward runs on those
        only and leaves the others' outputs as the attention's (see `CausalLM.hidden_states`)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, absorb)
        hn = self.post_attention_layernorm(h)
        B, T, D = h.shape
        unpad = token_index is not None and not (isinstance(self.mlp, MoE) and self.mlp.seq_aux_alpha > 0)
        if unpad:  # (the sequence-wise balance loss needs whole rows, so it keeps them)
            hn = hn.reshape(B * T, D).index_select(0, token_index)[None]  # [1, N, D]
            if routing is not None:
                routing = routing.reshape(B * T, -1).index_select(0, token_index)[None]
        out = self.mlp(hn, routing) if routing is not None else self.mlp(hn)
        if unpad:
            out = out.new_zeros(B * T, D).index_copy(0, token_index, out[0]).view(B, T, D)
            if isinstance(self.mlp, MoE) and self.mlp.record_routing:  # recorded as [B, T, K], -1 where skipped
                ids = self.mlp.last_expert_ids[0]
                self.mlp.last_expert_ids = ids.new_full((B * T, ids.shape[-1]), -1).index_copy(
                    0, token_index, ids).view(B, T, -1)
        return h + out

    def decode(self, x: torch.Tensor, rope: torch.Tensor, bias: torch.Tensor, cache: CacheView) -> torch.Tensor:
        """One new token per sequence, what `forward` with T = 1 and absorb computes, in fewer ops (on a CPU
        a decode step's small ops cost more than its matmuls): x [B, D] -> [B, D].
        rope [B, dr, dr] (`rope_matrices`); bias [B, S] (0 where the token may attend, -inf where not)."""
        attn = self.self_attn
        q, latent = attn.decode_query_and_latent(self.input_layernorm(x), rope)
        cache.write(attn.layer_idx, latent[:, None])
        if isinstance(cache, PagedCacheView):  # read in place (model.kernels)
            h = x + attn.decode_attend_paged(q, cache)
        else:
            h = x + attn.decode_attend(q, cache.read(attn.layer_idx), bias)
        return h + self.mlp(self.post_attention_layernorm(h)[:, None])[:, 0]


class Decoder(nn.Module):
    """Token embeddings and the stack of blocks; returns hidden states before the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryTable(cfg)
        self.gradient_checkpointing = False
        self.compiled_decode = None  # a model.compiled.CompiledDecode, set by CausalLM.compile_decode
        self.compiled_blocks: list[nn.Module] | None = None  # torch.compile'd layers, set by CausalLM.compile_blocks

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: CacheView | None = None, absorb: bool = False,
                routing: torch.Tensor | None = None, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [B, T]; mask [B, T, S] or None (causal) -> hidden [B, T, D].
        routing [B, T, M, K]: expert ids to replay in the M MoE layers, in layer order.
        token_index [N]: the flat positions whose outputs matter (see `Block.forward`)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        if cache is not None and absorb and input_ids.shape[1] == 1 and routing is None \
                and not torch.is_grad_enabled():  # a decode step: the fused path
            assert mask is not None
            bias = torch.zeros(mask.shape[0], mask.shape[2], dtype=torch.float32, device=h.device)
            bias.masked_fill_(~mask[:, 0], float("-inf"))
            x = h[:, 0]
            rope = rope_matrices(cos[:, 0], sin[:, 0], self.rotary.interleaved).to(x.dtype)
            if self.compiled_decode is not None:
                return self.compiled_decode.step(x, rope, bias, cache)[:, None]
            for layer in self.layers:
                x = layer.decode(x, rope, bias, cache)
            return x[:, None]
        moe_index = 0
        for layer in self.layers:
            layer_routing = None
            if routing is not None and isinstance(layer.mlp, MoE):
                layer_routing = routing[:, :, moe_index]
                moe_index += 1
            if cache is None and self.compiled_blocks is not None:
                layer = self.compiled_blocks[layer.self_attn.layer_idx]
            if self.gradient_checkpointing and self.training and cache is None:
                h = checkpoint(layer, h, cos, sin, mask, None, False, layer_routing, token_index, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, absorb, layer_routing, token_index)
        return h


    def decode_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedCacheView) -> torch.Tensor:
        """One decode step over the paged pool with nothing read back to the host, so a CUDA graph can capture
        it (no position check, no mask: the attention kernel masks by `cache.lengths`).
        input_ids, positions [B] -> the last block's output [B, D]."""
        x = self.embed_tokens(input_ids)
        rope = rope_matrices(self.rotary.cos[positions], self.rotary.sin[positions], self.rotary.interleaved)
        rope = rope.to(x.dtype)
        for layer in self.layers:
            x = layer.decode(x, rope, None, cache)  # type: ignore[arg-type]  (a paged view reads no bias)
        return x


class MTPLayer(nn.Module):
    """One Multi-Token Prediction depth (DeepSeek-V3 section 2.2): combines the previous depth's hidden
    state at i with the embedding of token i+k and runs one more block; shares embedding and head."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_idx)
        self.shared_head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, prev_hidden: torch.Tensor, next_embeds: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """prev_hidden, next_embeds [B, T, D] -> this depth's hidden [B, T, D] (before its head norm)."""
        h = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(prev_hidden)], dim=-1))
        return self.block(h, cos, sin, None)


class CausalLM(nn.Module):
    """DeepSeek-V3 for causal language modelling: input_ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))

    # ----- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: CacheView | None = None,
                absorb: bool = False, routing: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. See `hidden_states` for the arguments."""
        hidden = self.hidden_states(input_ids, positions, attention_mask, cache, absorb, routing)
        return self.logits(hidden)

    @torch.no_grad()
    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedCacheView) -> torch.Tensor:
        """A decode step of one token per sequence over the paged latent pool, free of host syncs (the rollout
        engine's CUDA path, eager or captured in a CUDA graph): input_ids, positions [B] -> logits [B, V] float32."""
        return self.logits(self.model.decode_paged(input_ids, positions, cache)).float()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last block's output [..., D] (`hidden_states`) normalized as the LM head reads it [..., D];
        the head itself is `lm_head` (callers computing chunked log-probs multiply by `lm_head.weight`)."""
        return self.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., D] (the last block's output, `hidden_states`) -> logits [..., V]: the final
        norm, then the LM head."""
        return self.lm_head(self.final_norm(hidden))

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks, in order (the units FSDP shards and a parameter count walks)."""
        return self.model.layers

    @property
    def compiled_decode(self):
        """The compiled decode step (`model.compiled.CompiledDecode`) once `compile_decode` has run, else None."""
        return self.model.compiled_decode

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, cache: CacheView | None = None,
                      absorb: bool = False, routing: torch.Tensor | None = None,
                      token_index: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output [B, T, D], before the final norm.

        positions [B, T]: token positions; by default counted from the first real token of each row.
        attention_mask [B, T]: 1 for real tokens, 0 for padding (either side).
        cache: write this call's latents there and attend over the view's context (prefill or decode).
        absorb: attend with the weight-absorbed path (the decode path; needs no per-head keys).
        routing [B, T, M, K]: routing replay, the expert ids each token uses in each of the M MoE layers
            (-1: let the gate choose), e.g. what `recorded_routing` returned for the same tokens.
        token_index [N]: flat positions (b * T + t) of the tokens whose hidden states will be used, e.g. the
            real tokens of a right-padded batch: the feed-forward layers (most of the compute) skip the
            rest. Exact for those tokens when no kept token attends to a skipped one (right padding, causal);
            the skipped positions' hidden states are then meaningless.
        """
        if positions is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit positions")
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = self._attention_mask(input_ids.shape[1], positions, attention_mask, cache)
        return self.model(input_ids, positions.clamp(min=0), mask, cache, absorb, routing, token_index)

    @staticmethod
    def _attention_mask(T: int, positions: torch.Tensor, attention_mask: torch.Tensor | None,
                        cache: CacheView | None) -> torch.Tensor | None:
        """[B, T, S] bool, True where query t may attend to key s; None for plain causal."""
        if cache is not None:  # context slots are in position order: key s sits at position s
            S = cache.context_len
            return torch.arange(S, device=positions.device)[None, None, :] <= positions[:, :, None]
        if attention_mask is None:
            return None
        causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
        mask = causal[None] & attention_mask.bool()[:, None, :]
        return mask | torch.eye(T, dtype=torch.bool, device=positions.device)[None]  # pad rows stay finite

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Multi-token prediction from the main model's `hidden_states` [B, T, D].

        Depth k (1-based) at position i predicts token i + k + 1, so its logits are [B, T - k, V] and
        their targets are input_ids[:, k + 1:] (the last position has no target)."""
        out = []
        T = input_ids.shape[1]
        prev = hidden
        for k, layer in enumerate(self.mtp, start=1):
            n = T - k
            positions = torch.arange(n, device=input_ids.device).expand(input_ids.shape[0], n)
            cos, sin = self.model.rotary(positions)
            prev = layer(prev[:, :n], self.model.embed_tokens(input_ids[:, k:]), cos, sin)
            out.append(self.lm_head(layer.shared_head_norm(prev)))
        return out

    def mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over depths of the cross-entropy of the MTP predictions; loss_mask [B, T] marks the target
        tokens that count (e.g. completion tokens in SFT)."""
        if not len(self.mtp):
            raise ValueError("this model has no MTP modules (num_nextn_predict_layers = 0)")
        losses = []
        for k, logits in enumerate(self.mtp_logits(hidden, input_ids), start=1):
            targets = input_ids[:, k + 1:]
            lg = logits[:, :-1]
            ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), targets.reshape(-1), reduction="none")
            if loss_mask is None:
                losses.append(ce.mean())
            else:
                m = loss_mask[:, k + 1:].reshape(-1).to(ce.dtype)
                losses.append((ce * m).sum() / m.sum().clamp(min=1))
        return torch.stack(losses).mean()

    def compile_decode(self, verbose: bool = False) -> CausalLM:
        """Run decode steps (the absorbed, one-token, cached forward without grad) through graphs compiled
        ahead of time by AOTInductor: several times fewer op calls per step (see `model.compiled`). Needs a
        C++ compiler; the first use of a model shape compiles for tens of seconds, later ones load the
        cached packages. The compiled step computes what the eager one does, to float rounding."""
        from .compiled import CompiledDecode

        compiler = os.environ.get("CXX") or "c++"
        if self.lm_head.weight.device.type == "cpu" and not any(shutil.which(c) for c in (compiler, "g++", "clang++")):
            raise RuntimeError("compiling the decode step needs a C++ compiler (c++, g++ or clang++ on PATH, or $CXX): "
                               "install one, or run rollouts eager (rollout.compile: false, Engine(compile=False))")
        self.model.compiled_decode = CompiledDecode(self, verbose=verbose)
        return self

    def compile_blocks(self) -> CausalLM:
        """Full-sequence forwards without a cache (training, reference and old log-probs) run each decoder
        block through torch.compile: inductor fuses the elementwise work of the norms, RoPE, SwiGLU and
        their backward into a few kernels, which on a CPU are bandwidth-bound passes over the activations.
        Shapes are dynamic, so new batch and sequence lengths reuse the compiled code. Each block compiles
        whole, the routed experts' dispatch included: the grouped matmul is an op of ours
        (`model.moe.grouped_mm`), and the dispatch reads nothing back to the host. The first forward compiles
        (tens of seconds; cached by inductor on disk). Cached forwards (rollouts) are unaffected: see
        `compile_decode`."""
        self.model.compiled_blocks = [torch.compile(b, dynamic=True) for b in self.model.layers]
        return self

    def forget_derived_weights(self) -> None:
        """Mark stale the inference-time weights derived from the parameters (MLA's absorbed and stacked
        projections, the MLPs' stacked gate and up): they are remade, in place, on next use. They are also
        remade when a parameter's version counter moves, but not every in-place update moves it: PyTorch's
        fused AdamW kernel does not. So the rollout engine calls this at the start of every generate."""
        for m in self.modules():
            if m is not self and hasattr(m, "forget_derived_weights"):
                m.forget_derived_weights()

    def refresh_derived_weights(self) -> None:
        """Remake now, in place, every derived weight made before: what a CUDA graph captured over them
        replays without calling back into Python (`grpo.rollout.cuda_graphs`)."""
        for m in self.modules():
            if m is not self and hasattr(m, "refresh_derived_weights"):
                m.refresh_derived_weights()

    # ----- MoE balancing ----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_moe_balancing(self, track_load: bool = False, seq_aux_alpha: float = 0.0) -> None:
        """track_load: count expert loads for `update_router_bias`; seq_aux_alpha: weight of the
        sequence-wise balance loss (read it with `balance_loss` after a forward)."""
        for m in self.moe_layers():
            m.track_load, m.seq_aux_alpha = track_load, seq_aux_alpha

    def record_routing(self, on: bool = True) -> None:
        """Keep the expert ids of each forward, for `recorded_routing` (routing replay)."""
        for m in self.moe_layers():
            m.record_routing, m.last_expert_ids = on, None

    def recorded_routing(self) -> torch.Tensor | None:
        """The last forward's expert ids [B, T, M, K] over the M MoE layers; None without MoE or recording."""
        ids = [b.mlp.last_expert_ids for b in self.model.layers if isinstance(b.mlp, MoE)]
        if not ids or any(i is None for i in ids):
            return None
        return torch.stack(ids, dim=2)

    def balance_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def update_router_bias(self, speed: float) -> None:
        """The aux-loss-free update: call after each optimizer step with the bias update speed (gamma)."""
        for m in self.moe_layers():
            m.update_bias(speed)

    def tie_weights(self) -> None:
        """Shares the embedding with the LM head when the config says so (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def inference_copy(self, dtype: torch.dtype) -> CausalLM:
        """A second model of this config on this device with the weights cast to `dtype` (the routing bias and
        RoPE tables kept in float32), built on the meta device first so no float32 copy is ever made; the
        rollout engine decodes with it (`copy_weights_from` refreshes it)."""
        with torch.device("meta"):
            twin = CausalLM(self.config)
        twin = twin.to_empty(device=self.lm_head.weight.device)
        for p in twin.parameters():
            p.data = p.data.to(dtype)
        twin.tie_weights()
        twin.reset_buffers()
        return twin.copy_weights_from(self).eval()

    @torch.no_grad()
    def copy_weights_from(self, source: CausalLM) -> CausalLM:
        """Every parameter and the routing bias copied in place from `source` (same config), cast to this
        model's dtypes: tensors keep their addresses, so what holds them (a CUDA graph) reads the new values."""
        for p, q in zip(self.parameters(), source.parameters()):
            p.copy_(q)
        for mine, theirs in zip(self.moe_layers(), source.moe_layers()):
            if mine.gate.e_score_correction_bias is not None:
                mine.gate.e_score_correction_bias.copy_(theirs.gate.e_score_correction_bias)
        return self

    def reset_buffers(self) -> None:
        """Recomputes the buffers no checkpoint holds (after building on the meta device) and keeps the
        routing bias in float32 whatever the weights' dtype."""
        device = self.lm_head.weight.device
        self.model.rotary = RotaryTable(self.config).to(device)
        for m in self.moe_layers():
            m.expert_load = torch.zeros(m.n_experts, device=device)
            bias = m.gate.e_score_correction_bias
            if bias is not None:
                m.gate.e_score_correction_bias = bias.float()

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
        """Writes a Hugging Face checkpoint (config.json + safetensors) that transformers and vLLM load."""
        save_pretrained(self, path, max_shard_bytes)

    # ----- construction ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> CausalLM:
        """Random initialization: N(0, initializer_range) for matrices, ones for norms, zero biases."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if name.endswith("norm.weight") else p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.zero_()
        self.reset_buffers()
        return self

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (K of E routed experts), without MTP."""
        total = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("mtp."))
        if active:
            for m in self.moe_layers():
                unused = m.n_experts - m.top_k
                total -= unused * (m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel())
        return total
