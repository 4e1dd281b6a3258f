"""Our weights as a Hugging Face checkpoint: the on-disk names (transformers' DeepseekV3/V2), the state dict under
them, and `save_pretrained` (config.json + safetensors). Reading lives in `model.checkpoint`, which builds the
model; this module needs no model class, so `CausalLM.save_pretrained` can use it and imports go one way:
checkpoint -> transformer -> hf_format."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
EXPERT_NAME = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# MTP layers on disk carry copies of the shared embedding and head; in memory they are shared.
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model its config describes."""


# ----- names ---------------------------------------------------------------------------------------
def to_hf_name(name: str, num_layers: int) -> str:
    """Our in-memory name -> the on-disk name (experts are handled separately)."""
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if not m:
        return name
    layer, rest = num_layers + int(m.group(1)), m.group(2)
    rest = rest.removeprefix("block.")
    rest = rest.replace("shared_head_norm.", "shared_head.norm.")
    return f"model.layers.{layer}.{rest}"


def from_hf_name(name: str, num_layers: int) -> str | None:
    """On-disk name -> our name; None for copies of shared tensors that we do not keep."""
    m = LAYER_NAME.match(name)
    if not m or int(m.group(1)) < num_layers:
        return name
    k, rest = int(m.group(1)) - num_layers, m.group(2)
    if rest in _MTP_SHARED:
        return None
    if rest.startswith("shared_head.norm."):
        return f"mtp.{k}.shared_head_norm.{rest.removeprefix('shared_head.norm.')}"
    if rest.startswith(_MTP_OWN):
        return f"mtp.{k}.{rest}"
    return f"mtp.{k}.block.{rest}"


def hf_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Our weights under transformers' names, experts unstacked, MTP layers with their shared copies."""
    cfg = model.config
    L = cfg.num_hidden_layers
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("experts.gate_up_proj"):
            prefix = to_hf_name(name.removesuffix(".gate_up_proj"), L)
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", gate[e]
                yield f"{prefix}.{e}.up_proj.weight", up[e]
        elif name.endswith("experts.down_proj"):
            prefix = to_hf_name(name.removesuffix(".down_proj"), L)
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield to_hf_name(name, L), t
    for k in range(len(model.mtp)):
        yield f"model.layers.{L + k}.embed_tokens.weight", model.model.embed_tokens.weight.detach()
        yield f"model.layers.{L + k}.shared_head.head.weight", model.lm_head.weight.detach()


# ----- writing ---------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Writes config.json and safetensors (sharded above `max_shard_bytes`) into `path`, atomically:
    the files are written to a temporary directory beside it, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in hf_state_dict(model):
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            # A host copy (safetensors writes from host memory): a model on a GPU saves without a GPU copy of a shard.
            shards[-1][name] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            size += nbytes
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model.config.save(tmp, dtype=dtype)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_NAME), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
                total += sum(t.numel() * t.element_size() for t in shard.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2, sort_keys=True))
        # Keep files that are not ours (tokenizer, generation config) when overwriting a directory.
        if path.exists():
            for f in path.iterdir():
                if f.is_file() and not (f.suffix == ".safetensors" or f.name in ("config.json", INDEX_NAME)):
                    shutil.copy2(f, tmp / f.name)
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
