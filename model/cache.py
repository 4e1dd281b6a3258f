"""The latent KV cache: per layer and token it holds only the normalized KV latent and the roped key,
(kv_lora_rank + qk_rope_head_dim) values. Storage is a flat pool of slots; a `CacheView` says where
this forward's tokens are written and which slots each sequence attends to, so a contiguous
per-sequence layout and a paged block table (the rollout engine's) are the same thing to the model."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .config import ModelConfig


class LatentCache:
    """Slot pool [num_layers, num_slots, kv_lora_rank + qk_rope_head_dim]."""

    def __init__(self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", zeroed: bool = True):
        """zeroed=False leaves the pool uninitialized but for slot 0, so memory is only touched as it is
        used: for callers (the rollout engine) that never read a slot before writing it, except slot 0,
        which they use as the padding of context they mask out (it must hold finite values)."""
        self.kv_lora_rank = cfg.kv_lora_rank
        shape = (cfg.num_hidden_layers, num_slots, cfg.latent_dim)
        if zeroed:
            self.data = torch.zeros(shape, dtype=dtype, device=device)
        else:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            self.data[:, 0].zero_()

    @property
    def num_slots(self) -> int:
        return self.data.shape[1]

    @property
    def values_per_token_per_layer(self) -> int:
        return self.data.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers."""
        return self.data.shape[0] * self.data.shape[2] * self.data.element_size()


@dataclass
class CacheView:
    """Where one forward's tokens live in a `LatentCache`.

    write_slots:   [B, T] slot of each new token; -1 for padding, which is not written.
    context_slots: [B, S] slots of every token each sequence attends to, in position order (the new
                   ones included); padded with any valid slot, masked out by position.
    """

    cache: LatentCache
    write_slots: torch.Tensor
    context_slots: torch.Tensor

    @property
    def context_len(self) -> int:
        """S: how many positions each sequence attends over (the longest context in the batch)."""
        return self.context_slots.shape[1]

    def write(self, layer: int, latent: torch.Tensor) -> None:
        """latent [B, T, r + dr] -> the layer's slots."""
        slots, rows = self._write_plan
        pool = self.cache.data[layer]
        flat = latent.reshape(-1, latent.shape[-1])
        pool.index_copy_(0, slots, (flat if rows is None else flat.index_select(0, rows)).to(pool.dtype))

    @cached_property
    def _write_plan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Worked out once per view, for all layers: the slots written, and which of the B*T flattened
        tokens go there (None: all of them)."""
        flat_slots = self.write_slots.reshape(-1)
        keep = flat_slots >= 0
        if bool(keep.all()):
            return flat_slots, None
        rows = keep.nonzero()[:, 0]
        return flat_slots[rows], rows

    def read(self, layer: int) -> torch.Tensor:
        """-> context latents [B, S, r + dr]."""
        B, S = self.context_slots.shape
        # index_select copies whole rows: several times faster than advanced indexing here.
        return self.cache.data[layer].index_select(0, self.context_slots.reshape(-1)).view(B, S, -1)

    def read_buffer(self, layer: int) -> torch.Tensor:
        """-> a contiguous [B, C, r + dr] (C >= S) whose first S positions are `read(layer)`: what a compiled
        decode step takes, since its graph slices the context itself."""
        return self.read(layer)


@dataclass
class StagedCacheView(CacheView):
    """A decode view that also keeps the batch's context in a contiguous staging tensor.

    On a CPU without a paged-attention kernel, gathering every sequence's blocks each step costs more than
    the attention itself. While the batch stays the same, the staging copy (gathered once from the pool)
    receives each new latent beside the pool, and attention reads it in place.

    staging:         [L, B, capacity, r + dr], the context of the batch's sequences in position order.
    write_positions: [B, T] staging position of each new token (-1: padding).
    length:          S, the context length this step.
    """

    staging: torch.Tensor = None  # type: ignore[assignment]
    write_positions: torch.Tensor = None  # type: ignore[assignment]
    length: int = 0

    @property
    def context_len(self) -> int:
        return self.length

    def write(self, layer: int, latent: torch.Tensor) -> None:
        super().write(layer, latent)
        rows, positions, tokens = self._stage_plan
        flat = latent.reshape(-1, latent.shape[-1])
        self.staging[layer].index_put_((rows, positions),
                                       (flat if tokens is None else flat.index_select(0, tokens)).to(self.staging.dtype))

    @cached_property
    def _stage_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Once per view: the staging row and position of each written token, and which flattened tokens
        those are (None: all)."""
        B, T = self.write_positions.shape
        rows, cols = (self.write_positions >= 0).nonzero(as_tuple=True)
        tokens = None if len(rows) == B * T else rows * T + cols
        return rows, self.write_positions[rows, cols], tokens

    def read(self, layer: int) -> torch.Tensor:
        return self.staging[layer, :, : self.length]

    def read_buffer(self, layer: int) -> torch.Tensor:
        return self.staging[layer]


@dataclass
class PagedCacheView(CacheView):
    """A decode view over a paged pool, read in place through block tables: what the compiled decode step's
    paged attention kernel takes (`model.native`), so nothing is gathered or staged. Other readers get the
    context gathered from the same tables.

    block_tables: [B, W] int32, each sequence's blocks in position order (padded with any valid block).
    lengths:      [B] int64, how many positions each sequence attends to (the new token included).
    context_slots: None; worked out from the tables if a reader asks for the gathered context.
    """

    block_tables: torch.Tensor = None  # type: ignore[assignment]
    lengths: torch.Tensor = None  # type: ignore[assignment]
    block_size: int = 0
    max_length: int = 0

    @property
    def context_len(self) -> int:
        return self.max_length

    def write(self, layer: int, latent: torch.Tensor) -> None:
        """latent [B, 1, r + dr] -> the layer's slots. Every decode row has a slot (a padded row writes a scratch
        slot), so unlike `CacheView.write` nothing is read back to the host: a CUDA graph can capture it."""
        pool = self.cache.data[layer]
        pool.index_copy_(0, self.write_slots.reshape(-1), latent.reshape(-1, latent.shape[-1]).to(pool.dtype))

    def read(self, layer: int) -> torch.Tensor:
        if self.context_slots is None:  # once per view, for all layers
            S, bs = self.max_length, self.block_size
            position = torch.arange(S, device=self.block_tables.device)
            slots = self.block_tables.long().gather(1, (position // bs).expand(len(self.lengths), S)) * bs + position % bs
            # past a sequence's end: slot 0, masked out by position
            self.context_slots = torch.where(position < self.lengths[:, None], slots, torch.zeros_like(slots))
        return super().read(layer)


def contiguous_view(cache: LatentCache, positions: torch.Tensor, max_len: int) -> CacheView:
    """A view that gives sequence b the slots [b * max_len, (b + 1) * max_len): the simple layout for
    `generate`-style loops and tests. positions [B, T] of the new tokens (-1 for padding)."""
    B = positions.shape[0]
    base = torch.arange(B, device=positions.device)[:, None] * max_len
    write = torch.where(positions >= 0, base + positions.clamp(min=0), torch.full_like(positions, -1))
    context_len = int(positions.max()) + 1
    context = base + torch.arange(context_len, device=positions.device)[None, :]
    if int(context.max()) >= cache.num_slots:
        raise ValueError(f"cache of {cache.num_slots} slots is too small for {B} sequences of {max_len}")
    return CacheView(cache, write, context)
