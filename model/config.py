"""The model's hyper-parameters: one dataclass that reads and writes Hugging Face `config.json`
files of model_type `deepseek_v3` and `deepseek_v2`, and refuses values it cannot honour."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A config value that is unknown, missing or contradicts another one."""


@dataclass
class RopeScaling:
    """YaRN context extension (the only scaling DeepSeek ships); `factor == 1` means plain RoPE."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    @property
    def enabled(self) -> bool:
        return self.factor != 1.0


@dataclass
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V2/V3 model, named as in Hugging Face's config.json."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168  # model width D
    intermediate_size: int = 18432  # dense MLP width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 2048  # width of one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128  # H
    # Multi-head latent attention
    q_lora_rank: int | None = 1536  # None: queries are projected directly (V2-Lite)
    kv_lora_rank: int = 512  # r, the width of the cached KV latent
    qk_nope_head_dim: int = 128  # dn, per-head key/query part without position
    qk_rope_head_dim: int = 64  # dr, decoupled RoPE part, shared by all heads for keys
    v_head_dim: int = 128  # dv
    attention_bias: bool = False
    # DeepSeekMoE
    n_routed_experts: int | None = 256  # None: a dense model (every layer an MLP)
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8  # K
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Multi-token prediction
    num_nextn_predict_layers: int = 0
    # Positions
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleave: bool = True
    # Misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer: the KV latent plus the roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs.enabled and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.model_type in MODEL_TYPES, f"model_type {self.model_type!r}: allowed {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(int(getattr(self, name)) > 0, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r}: only 'silu' is supported")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        if self.n_routed_experts is None:
            return
        E, K = self.n_routed_experts, self.num_experts_per_tok
        need(self.scoring_func in SCORING_FUNCS, f"scoring_func {self.scoring_func!r}: allowed {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, f"topk_method {self.topk_method!r}: allowed {TOPK_METHODS}")
        need(0 < K <= E, f"num_experts_per_tok={K} must be in 1..n_routed_experts={E}")
        need(self.moe_layer_freq >= 1, "moe_layer_freq must be >= 1")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            need(self.n_group >= 1 and E % self.n_group == 0,
                 f"n_routed_experts={E} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
            need(self.topk_group * (E // self.n_group) >= K,
                 f"num_experts_per_tok={K} exceeds the experts in topk_group={self.topk_group} groups")
        if self.topk_method == "noaux_tc":
            need(self.scoring_func == "sigmoid", "topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
            need(E // self.n_group >= 2, "topk_method 'noaux_tc' ranks groups by their top-2 scores: "
                 f"needs at least 2 experts per group, got {E // self.n_group}")

    # ----- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads a Hugging Face config dict (V2, V2-Lite, V3, R1 layouts)."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type {model_type!r}: allowed {MODEL_TYPES}")
        v3 = model_type == "deepseek_v3"
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: d[k] for k in known if k in d and k not in ("rope_scaling", "rope_theta")}
        kw["model_type"] = model_type
        # V2 defaults differ from V3's; a V2 file that leaves a key out means V2's default.
        kw.setdefault("scoring_func", "sigmoid" if v3 else "softmax")
        kw.setdefault("topk_method", "noaux_tc" if v3 else "greedy")
        kw.setdefault("norm_topk_prob", v3)
        kw.setdefault("routed_scaling_factor", 2.5 if v3 else 1.0)
        kw.setdefault("first_k_dense_replace", 3 if v3 else 0)
        kw.setdefault("n_shared_experts", 1 if v3 else 2)
        if not v3:
            kw["rope_interleave"] = True  # V2 always rotates interleaved pairs
        if v3 and kw.get("topk_method") != "noaux_tc":
            # transformers' V3 always routes with the biased, group-limited sigmoid gate.
            raise ConfigError(f"deepseek_v3 topk_method {kw['topk_method']!r}: only 'noaux_tc' is defined for V3")
        for key in ("n_group", "topk_group"):
            if kw.get(key) is None:
                kw[key] = 1
        if kw.get("num_experts_per_tok") is None:
            kw["n_routed_experts"] = None
        # RoPE: legacy `rope_scaling` + `rope_theta`, or transformers 5's `rope_parameters`.
        rope = dict(d.get("rope_parameters") or {})
        rope.update(d.get("rope_scaling") or {})
        kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope_scaling type {rope_type!r}: allowed 'default' or 'yarn'")
        if rope_type == "yarn":
            factor = rope.get("factor")
            orig = rope.get("original_max_position_embeddings")
            if orig is None:
                raise ConfigError("rope_scaling of type 'yarn' needs original_max_position_embeddings")
            if factor is None:
                factor = d["max_position_embeddings"] / orig
            kw["rope_scaling"] = RopeScaling(
                factor=float(factor), original_max_position_embeddings=int(orig),
                beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                mscale=float(rope.get("mscale") or 0.0) or 1.0, mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
                truncate=bool(rope.get("truncate", True)))
            if rope.get("attention_factor") is not None:
                raise ConfigError("rope_scaling.attention_factor is not supported: give mscale / mscale_all_dim")
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers (DeepseekV3Config / DeepseekV2Config) and vLLM read."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_scaling"}
        d["architectures"] = ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        rs = self.rope_scaling
        if rs.enabled:
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta, "factor": rs.factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                    "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow, "mscale": rs.mscale,
                    "mscale_all_dim": rs.mscale_all_dim}
            if not rs.truncate:
                rope["truncate"] = False
        else:
            rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        d["rope_parameters"] = rope
        d["num_key_value_heads"] = self.num_attention_heads
        d["head_dim"] = self.qk_rope_head_dim
        d["qk_head_dim"] = self.qk_head_dim
        d["dtype"] = "float32"
        if self.n_routed_experts is None:
            # transformers has no dense switch: every layer dense is the same thing.
            d.update(n_routed_experts=1, num_experts_per_tok=1, first_k_dense_replace=self.num_hidden_layers,
                     n_group=1, topk_group=1)
        return d

    def save(self, directory: str | Path, dtype: str = "float32") -> None:
        d = self.to_hf_dict()
        d["dtype"] = dtype
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 (1 when not scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
