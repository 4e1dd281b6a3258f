"""Reading Hugging Face checkpoints (writing and the names: `model.hf_format`): config.json + safetensors (sharded with model.safetensors.index.json), under
the parameter names of transformers' DeepseekV3/V2, so V2/V3/R1 weights load and what we save loads in
transformers and vLLM. FP8 block-quantized weights (`weight_scale_inv`) are dequantized on load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .hf_format import (  # noqa: F401 - re-exported: the checkpoint API in one place
    EXPERT_NAME,
    INDEX_NAME,
    LAYER_NAME,
    SINGLE_NAME,
    CheckpointError,
    from_hf_name,
    hf_state_dict,
    save_pretrained,
    to_hf_name,
)
from .transformer import CausalLM


# ----- reading ---------------------------------------------------------------------------------------
def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        return [path / f for f in sorted(set(index["weight_map"].values()))]
    if (path / SINGLE_NAME).exists():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors files in {path}")
    return files


def _dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [M, N] float8 with one scale per block of [bm, bn] -> float32 [M, N]."""
    M, N = weight.shape
    bm, bn = block
    scale = scale_inv.float().repeat_interleave(bm, dim=0)[:M].repeat_interleave(bn, dim=1)[:, :N]
    return weight.float() * scale


def read_hf_tensors(path: str | Path, block: tuple[int, int] = (128, 128)) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint directory under its on-disk name, FP8 weights dequantized."""
    for file in _checkpoint_files(Path(path)):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if key.endswith("_scale_inv"):
                    continue
                t = f.get_tensor(key)
                scale_key = key + "_scale_inv"
                if scale_key in keys:
                    t = _dequantize_fp8(t, f.get_tensor(scale_key), block)
                elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    raise CheckpointError(f"{key} is {t.dtype} but {scale_key} is missing")
                yield key, t


def _checkpoint_has_mtp(path: Path, num_layers: int) -> bool:
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            if any((m := LAYER_NAME.match(k)) and int(m.group(1)) >= num_layers for k in f.keys()):  # noqa: SIM118 - safe_open is not a dict
                return True
    return False


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    mtp: bool = True) -> CausalLM:
    """Builds the model that `path/config.json` describes and loads its safetensors.

    MTP modules are built only when the checkpoint has their weights (and `mtp` is True). Missing,
    unexpected or mis-shaped tensors are refused with one message naming them all."""
    path = Path(path)
    cfg = ModelConfig.from_json(path)
    raw = json.loads((path / "config.json").read_text())
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    if cfg.num_nextn_predict_layers and not (mtp and _checkpoint_has_mtp(path, cfg.num_hidden_layers)):
        cfg.num_nextn_predict_layers = 0
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.reset_buffers()  # non-persistent buffers (RoPE tables); the routing bias stays float32
    expected = dict(model.state_dict())  # shares storage with the parameters
    loaded: set[str] = set()
    unexpected, misshaped = [], []
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    L = cfg.num_hidden_layers
    for key, t in read_hf_tensors(path, block):  # type: ignore[arg-type]
        m = EXPERT_NAME.match(key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        name = from_hf_name(key, L)
        if name is None:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name not in expected:
            unexpected.append(key)
        elif expected[name].shape != t.shape:
            misshaped.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(expected[name].shape)}")
        else:
            expected[name].copy_(t)
            loaded.add(name)
    for prefix, per_expert in experts.items():
        name = from_hf_name(prefix, L)
        gate_up_name, down_name = f"{name}.gate_up_proj", f"{name}.down_proj"
        if gate_up_name not in expected:
            unexpected.append(f"{prefix}.*")
            continue
        gate_up, down = expected[gate_up_name], expected[down_name]
        inter = gate_up.shape[1] // 2
        for e, parts in per_expert.items():
            if e >= gate_up.shape[0]:
                unexpected.append(f"{prefix}.{e}.*")
                continue
            for part, t in parts.items():
                target = down[e] if part == "down_proj" else gate_up[e, :inter] if part == "gate_proj" else gate_up[e, inter:]
                if target.shape != t.shape:
                    misshaped.append(f"{prefix}.{e}.{part}.weight: checkpoint {tuple(t.shape)}, model {tuple(target.shape)}")
                else:
                    target.copy_(t)
        complete = all(len(per_expert.get(e, {})) == 3 for e in range(gate_up.shape[0]))
        if complete:
            loaded.update((gate_up_name, down_name))
    missing = [n for n in expected if n not in loaded]
    if cfg.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")
    if missing or unexpected or misshaped:
        def show(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f" ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = []
        if missing:
            parts.append(f"missing: {show([to_hf_name(n, L) for n in missing])}")
        if unexpected:
            parts.append(f"unexpected: {show(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped: {show(misshaped)}")
        raise CheckpointError(f"checkpoint {path} does not match its config.json; " + "; ".join(parts))
    return model
