"""Multi-head Latent Attention (DeepSeek-V2 section 2.1): low-rank query and joint KV compression with
a decoupled RoPE key shared by all heads. Two ways to attend, chosen per call:

- expanded: the KV latent is up-projected into per-head keys and values (training and prefill);
- absorbed: W_UK is folded into the query and W_UV into the output, so attention runs directly over the
  cached latent (decode). The folded weights are derived once per weight version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import CacheView, PagedCacheView
from .config import ModelConfig
from .derived import DerivedWeights
from .norm import RMSNorm, rms_norm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.rope_interleave = cfg.rope_interleave
        D, H, bias = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)  # W_DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)  # W_UQ and W_QR
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope_dim, bias=bias)  # W_DKV and W_KR
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)  # W_UK, W_UV
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.decode = LatentDecode(self.n_heads, self.nope_dim, self.rope_dim, self.kv_lora_rank, self.softmax_scale,
                                   None if cfg.q_lora_rank is None else self.q_a_layernorm.eps,
                                   self.kv_a_layernorm.eps)
        self._absorbed = DerivedWeights()  # W_UK [H, dn, r], W_UV [H, dv, r]
        self._down = DerivedWeights()  # the stacked first projection and its bias

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: CacheView | None = None, absorb: bool = False) -> torch.Tensor:
        """x [B, T, D]; cos/sin [B, T, dr/2]; mask [B, T, S] bool (True: may attend) or None for plain
        causal over these T tokens; cache: where to write this call's latents and what to attend to.
        Returns [B, T, D]."""
        B, T, _ = x.shape
        H = self.n_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleave)

        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin, self.rope_interleave)], dim=-1)
        if cache is not None:  # latent [B, T, r + dr] is all that is kept
            cache.write(self.layer_idx, latent)
            latent = cache.read(self.layer_idx)  # [B, S, r + dr]

        if absorb:
            out = self._attend_absorbed(q_nope, q_pe, latent, mask)
        else:
            out = self._attend_expanded(q_nope, q_pe, latent, mask)
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def _attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """q_nope [B, T, H, dn], q_pe [B, T, H, dr], latent [B, S, r + dr] -> [B, T, H, dv]."""
        B, S, _ = latent.shape
        H = self.n_heads
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask.unsqueeze(1),
            is_causal=mask is None, scale=self.softmax_scale)  # [B, H, T, dv]
        return out.transpose(1, 2)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, dn, r] and W_UV [H, dv, r], re-derived only when kv_b_proj's weight changed."""
        w = self.kv_b_proj.weight

        def make():
            wkv_b = w.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
            return wkv_b[:, : self.nope_dim].contiguous(), wkv_b[:, self.nope_dim:].contiguous()
        w_uk, w_uv = self._absorbed.get((w.data_ptr(), w._version), make)
        return w_uk, w_uv  # type: ignore[return-value]

    def forget_derived_weights(self) -> None:
        """Remake the weights derived from this layer's parameters at their next use, in place (see
        CausalLM.forget_derived_weights)."""
        self._absorbed.mark_stale()
        self._down.mark_stale()

    def refresh_derived_weights(self) -> None:
        """Remake now, in place, the derived weights made before (what a captured decode graph reads)."""
        self._absorbed.refresh(self.absorbed_weights)
        self._down.refresh(self.down_weights)

    def down_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decode step's first projection: query input (q_a_proj, or q_proj without q LoRA) and
        kv_a_proj_with_mqa stacked into one weight [q_out + r + dr, D] (and bias), re-made per weight version."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        parts = [first.weight, self.kv_a_proj_with_mqa.weight]
        biases = [first.bias, self.kv_a_proj_with_mqa.bias]
        version = tuple(v for w in parts + biases if w is not None for v in (w.data_ptr(), w._version))

        def make():
            bias = None if biases[1] is None else torch.cat([
                biases[0] if biases[0] is not None else biases[1].new_zeros(first.weight.shape[0]), biases[1]]).detach()
            return torch.cat(parts).detach(), bias
        w_down, b_down = self._down.get(version, make)
        return w_down, b_down  # type: ignore[return-value]

    def decode_weights(self) -> tuple[tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]:
        """The tensors `LatentDecode.query_and_latent` and `LatentDecode.attend` take, in their order (the
        derived ones cached per weight version)."""
        w_down, b_down = self.down_weights()
        w_uk, w_uv = self.absorbed_weights()
        if self.q_lora_rank is None:
            q_norm, w_q = None, None
        else:
            q_norm, w_q = self.q_a_layernorm.weight, self.q_b_proj.weight
        return ((w_down, b_down, q_norm, w_q, w_uk, self.kv_a_layernorm.weight),
                (w_uv, self.o_proj.weight, self.o_proj.bias))

    def decode_query_and_latent(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See `LatentDecode.query_and_latent`; x [B, D] normalized."""
        return self.decode.query_and_latent(x, *self.decode_weights()[0], rope)

    def decode_attend(self, q: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """See `LatentDecode.attend`."""
        return self.decode.attend(q, context, bias, *self.decode_weights()[1])

    def decode_attend_paged(self, q: torch.Tensor, cache: PagedCacheView) -> torch.Tensor:
        """`decode_attend` reading the paged pool in place through the block tables (`model.kernels`: Triton
        on CUDA, the C++ op on a CPU where built, else PyTorch's over the gathered context): q [B, H, r + dr]
        -> [B, D]."""
        pool = cache.cache.data[self.layer_idx]
        out_latent = kernels.paged_latent_attention(q.to(pool.dtype), pool, cache.block_tables, cache.lengths,
                                                    cache.block_size, self.kv_lora_rank, self.softmax_scale)
        return self.decode.project_out(out_latent.to(q.dtype), *self.decode_weights()[1])

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
        """Attention in latent space: scores = (q_nope W_UK) . c + q_pe . k_pe; out = (p . c) W_UV.
        q_nope [B, T, H, dn], q_pe [B, T, H, dr], latent [B, S, r + dr] -> [B, T, H, dv]."""
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        if torch.is_grad_enabled() and self.kv_b_proj.weight.requires_grad:
            wkv_b = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk, w_uv = wkv_b[:, : self.nope_dim], wkv_b[:, self.nope_dim:]
        else:
            w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        q_full = torch.cat([q_latent, q_pe], dim=-1).reshape(B, T * H, -1)  # [B, T*H, r + dr]
        scores = torch.bmm(q_full, latent.transpose(1, 2)) * self.softmax_scale  # [B, T*H, S]
        scores = scores.view(B, T, H, S)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q_nope.device).tril(S - T)[None]
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(latent.dtype).view(B, T * H, S)
        out_latent = torch.bmm(probs, latent[..., : self.kv_lora_rank]).view(B, T, H, self.kv_lora_rank)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)



@dataclass(frozen=True)
class LatentDecode:
    """MLA's decode step (one new token per sequence, weight-absorbed, over the latent cache) as pure
    functions of tensors, in fewer ops than `MLA.forward`: the first projections stacked into one matmul,
    W_UK folded into the query and W_UV into the output, RoPE as one matrix per token, the mask as a bias.
    `MLA` runs them eagerly with its own weights; `model.compiled` compiles them ahead of time, with the
    weights as inputs, so that one compiled graph serves every layer."""

    n_heads: int
    nope_dim: int
    rope_dim: int
    kv_lora_rank: int
    softmax_scale: float
    q_norm_eps: float | None  # None: no query LoRA (w_down starts with q_proj's rows)
    kv_norm_eps: float

    def query_and_latent(self, x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                         q_norm: torch.Tensor | None, w_q: torch.Tensor | None, w_uk: torch.Tensor,
                         kv_norm: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, D] (normalized); w_down [q_in + r + dr, D] (`MLA.down_weights`); q_norm [q_in], w_q
        [H * (dn + dr), q_in] (the query LoRA's norm and up-projection); w_uk [H, dn, r]; kv_norm [r];
        rope [B, dr, dr] (`rope_matrices`). Returns the query in latent space [B, H, r + dr] and the token's
        latent [B, r + dr] for the cache."""
        B, r, dr = x.shape[0], self.kv_lora_rank, self.rope_dim
        q_in, kv, k_pe = F.linear(x, w_down, b_down).split([w_down.shape[0] - r - dr, r, dr], dim=-1)
        q = q_in if self.q_norm_eps is None else F.linear(rms_norm(q_in, q_norm, self.q_norm_eps), w_q)
        q_nope, q_pe = q.view(B, self.n_heads, self.nope_dim + dr).split([self.nope_dim, dr], dim=-1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
        q_full = torch.cat([q_latent, torch.bmm(q_pe, rope)], dim=-1)
        latent = torch.cat([rms_norm(kv, kv_norm, self.kv_norm_eps),
                            torch.bmm(k_pe[:, None], rope)[:, 0]], dim=-1)
        return q_full, latent

    def attend(self, q: torch.Tensor, context: torch.Tensor, bias: torch.Tensor, w_uv: torch.Tensor,
               w_o: torch.Tensor, b_o: torch.Tensor | None) -> torch.Tensor:
        """Attention over the latent context and the output projection: q [B, H, r + dr]; context
        [B, S, r + dr]; bias [B, S] (0, or -inf for keys to skip); w_uv [H, dv, r]; w_o [D, H * dv] -> [B, D]."""
        return self.project_out(self.attention(q, context, bias), w_uv, w_o, b_o)

    def attention(self, q: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(scale * q . context + bias) . context[..., :r]: q [B, H, r + dr], context [B, S, r + dr],
        bias [B, S] -> [B, H, r] (the compiled step runs `model.native`'s single-pass kernel instead)."""
        scores = torch.baddbmm(bias[:, None, :].to(q.dtype), q, context.transpose(1, 2), alpha=self.softmax_scale)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # [B, H, S]
        return torch.bmm(probs, context[..., : self.kv_lora_rank])

    def project_out(self, out_latent: torch.Tensor, w_uv: torch.Tensor, w_o: torch.Tensor,
                    b_o: torch.Tensor | None) -> torch.Tensor:
        """W_UV then the output projection: out_latent [B, H, r] -> [B, D]."""
        B = out_latent.shape[0]
        out = torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, dv]
        return F.linear(out.reshape(B, -1), w_o, b_o)
