"""Runs the model for a batch of sequences over the paged latent cache: the expanded MLA path for
prefill, the weight-absorbed path for decode. Tensors in, last-position logits out; it makes no
scheduling decisions."""

from __future__ import annotations

import numpy as np
import torch

from model import CacheView, CausalLM, LatentCache
from model.cache import PagedCacheView, StagedCacheView

from .cuda_graphs import DecodeGraphs
from .decode_batch import DecodeBatch, check_one_new_token, write_block_tables
from .sequence import Sequence

DECODE_PATHS = ("eager", "buffers", "graphs")


class PendingStep:
    """A sampled decode step launched on the device whose tokens the host has not read yet (overlap): `seqs` in
    row order, their output [2, P] on the device, and its read-back under way."""

    def __init__(self, seqs: list[Sequence], out: torch.Tensor, graphs: DecodeGraphs):
        self.seqs, self.out = seqs, out
        self.host, self.event = graphs.start_read(out)

    def result(self) -> tuple[list[int], list[float]]:
        """Waits for the read-back; the sequences' sampled tokens and their log-probs, row by row."""
        if self.event is not None:
            self.event.synchronize()
        return DecodeGraphs.tokens_of(self.host, len(self.seqs))


class ModelRunner:
    """decode_path: how decode steps run.
      "eager":   the CPU's path: inputs built per step, the context staged (or read in place by the compiled
                 step's paged kernel);
      "buffers": inputs in persistent device buffers, a step free of host syncs (`CausalLM.decode_logits`);
                 the host side of its inputs kept from step to step (`DecodeBatch`);
      "graphs":  "buffers" captured in CUDA graphs (`DecodeGraphs`), the CUDA default. Recording routing
                 runs it uncaptured (the recorded experts are read per step).
    max_batch, max_blocks: the most sequences a step holds and blocks a sequence holds (the buffers' sizes)."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype | None = None,
                 record_routing: bool = False, decode_path: str = "eager", max_batch: int = 256,
                 max_blocks: int | None = None):
        if decode_path not in DECODE_PATHS:
            raise ValueError(f"decode_path={decode_path!r}: allowed are {', '.join(map(repr, DECODE_PATHS))}")
        device = model.lm_head.weight.device
        if decode_path == "graphs" and device.type != "cuda":
            raise ValueError(f"decode_path='graphs' captures CUDA graphs, but the model is on {device}; "
                             "use 'buffers' or 'eager'")
        self.model = model
        self.record_routing = record_routing  # keep each token's experts on its sequence (routing replay)
        self.block_size = block_size
        self.decode_path = decode_path
        scratch = 0 if decode_path == "eager" else 1  # a block no sequence owns: padded rows write there
        self.cache = LatentCache(model.config, (num_blocks + scratch) * block_size,
                                 dtype or model.lm_head.weight.dtype, device,
                                 zeroed=False)  # every slot is written before it is read; padding reads slot 0
        self.decode_graphs: DecodeGraphs | None = None
        self.decode_batch: DecodeBatch | None = None  # the buffered paths' inputs, kept from step to step
        if decode_path != "eager":
            max_blocks = max_blocks or -(-model.config.max_position_embeddings // block_size)
            self.decode_graphs = DecodeGraphs(model, self.cache, block_size, max_batch, max_blocks, num_blocks,
                                              capture=decode_path == "graphs" and not record_routing)
            self.decode_batch = DecodeBatch(self.decode_graphs, block_size)
        self.stage_headroom = 64  # decode steps a staging copy lasts before it is regathered
        self._stage_key: list[int] = []
        self._staging: torch.Tensor | None = None

    def reset(self) -> None:
        """A new generate call: forget the staging copy, and remake the weights derived from the parameters (the
        trainer may have stepped them); the decode graphs remake theirs in place and keep their captures
        unless a parameter moved (`DecodeGraphs.refresh`)."""
        self._stage_key, self._staging = [], None
        self.forget_batch()
        if self.decode_graphs is not None:
            self.decode_graphs.model = self.model
            self.decode_graphs.refresh()
        else:
            self.model.forget_derived_weights()

    def forget_batch(self) -> None:
        """The next buffered decode step rewrites all its inputs (`DecodeBatch.forget`); at the end of a generate,
        this drops the batch's last sequences."""
        if self.decode_batch is not None:
            self.decode_batch.forget()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's latents (all layers) into block dst."""
        bs = self.block_size
        if copies:
            self.forget_batch()  # a table changed inside: rewrite the rows
        for src, dst in copies:
            self.cache.data[:, dst * bs:(dst + 1) * bs] = self.cache.data[:, src * bs:(src + 1) * bs]

    @staticmethod
    def _block_tables(seqs: list[Sequence], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """[B, W] each sequence's blocks, padded with block 0 to the longest table."""
        out = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), np.int32 if dtype == torch.int32 else np.int64)
        write_block_tables(seqs, out)
        return torch.from_numpy(out)

    def _slots(self, seqs: list[Sequence], positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] (-1: none) -> cache slots [B, T] (-1 where position is -1)."""
        tables = self._block_tables(seqs)
        p = positions.clamp(min=0)
        slots = tables.gather(1, p // self.block_size) * self.block_size + p % self.block_size
        return torch.where(positions >= 0, slots, torch.full_like(slots, -1))

    def _context_slots(self, seqs: list[Sequence], width: int) -> torch.Tensor:
        """[B, width] slots of positions 0..width-1 of each sequence (slot 0 past its end: masked)."""
        context = torch.arange(width).expand(len(seqs), width)
        lens = torch.tensor([s.num_tokens for s in seqs])[:, None]
        return self._slots(seqs, torch.where(context < lens, context, torch.full_like(context, -1))).clamp(min=0)

    def _staged_view(self, seqs: list[Sequence], positions: torch.Tensor, slots: torch.Tensor, S: int) -> StagedCacheView:
        """Decode view over the staging copy, regathered from the pool when the batch changed or outgrew it.
        positions, slots [B, 1]: the new tokens'."""
        key = [s.seq_id for s in seqs]
        if key != self._stage_key or self._staging is None or self._staging.shape[2] < S:
            capacity = S + self.stage_headroom
            context = self._context_slots(seqs, capacity).reshape(-1)
            L, _, D = self.cache.data.shape
            self._staging = self.cache.data.index_select(1, context).view(L, len(seqs), capacity, D)
            self._stage_key = key
        return StagedCacheView(self.cache, slots, positions.new_zeros(0, 0),
                               staging=self._staging, write_positions=positions, length=S)

    def _paged_view(self, seqs: list[Sequence], positions: torch.Tensor, slots: torch.Tensor, S: int) -> PagedCacheView:
        """Decode view that the compiled step's paged kernel reads in place: the block tables, no copies."""
        tables, lengths = self._block_tables(seqs, torch.int32), torch.tensor([s.num_tokens for s in seqs])
        return PagedCacheView(self.cache, slots, None, block_tables=tables, lengths=lengths,  # type: ignore[arg-type]
                              block_size=self.block_size, max_length=S)

    def _decode_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step's ids, positions and cache slots [B, 1] (worked out in Python, one conversion for the
        three; the buffered paths keep theirs from step to step instead, `DecodeBatch`)."""
        check_one_new_token(seqs)
        bs = self.block_size
        positions = [s.num_cached for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        ids, positions_, slots_ = torch.from_numpy(np.array([[s.token_ids[-1] for s in seqs], positions, slots]))[:, :, None]
        return ids, positions_, slots_

    @torch.no_grad()
    def forward(self, seqs: list[Sequence], prefill: bool) -> torch.Tensor:
        """Feeds each sequence's uncached tokens; returns the logits of its last token [B, V] (float32)."""
        if not prefill and self.decode_graphs is not None:
            return self._decode_buffered(seqs)
        starts = [s.num_cached for s in seqs]
        lens = [s.num_tokens for s in seqs]
        S = max(lens)
        if prefill:
            T = max(n - c for n, c in zip(lens, starts))
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            positions = torch.full((len(seqs), T), -1, dtype=torch.long)
            for b, (s, c, n) in enumerate(zip(seqs, starts, lens)):
                ids[b, : n - c] = torch.tensor(s.token_ids[c:n])
                positions[b, : n - c] = torch.arange(c, n)
            device = self.cache.data.device
            view: CacheView = CacheView(self.cache, self._slots(seqs, positions).to(device),
                                        self._context_slots(seqs, S).to(device))
            self._stage_key = []  # the staging copy lacks what this prefill writes (e.g. a resumed sequence's)
            self.forget_batch()  # the tables and tokens may have changed in any way
        else:
            ids, positions, slots = self._decode_inputs(seqs)
            compiled = self.model.compiled_decode
            if compiled is not None and compiled.reads_pages:
                view = self._paged_view(seqs, positions, slots, S)
            else:  # attention that wants each sequence's context contiguous
                view = self._staged_view(seqs, positions, slots, S)
        device = self.model.lm_head.weight.device
        if self.record_routing:
            self.model.record_routing(True)
        try:
            hidden = self.model.hidden_states(ids.to(device), positions.clamp(min=0).to(device), cache=view,
                                              absorb=not prefill)
            routing = self.model.recorded_routing() if self.record_routing else None  # [B, T, M, K]
        finally:
            if self.record_routing:
                self.model.record_routing(False)
        if prefill:
            last = hidden[torch.arange(len(seqs)), torch.tensor(lens) - torch.tensor(starts) - 1]  # [B, D]
        else:
            last = hidden[:, 0]
        if routing is not None:
            for b, (s, c, n) in enumerate(zip(seqs, starts, lens)):
                chunk = routing[b, : n - c].to(torch.int16).cpu()
                s.routing = [chunk] if c == 0 else [*s.routing, chunk]  # c == 0: a (re)computed prefill
        for s, n in zip(seqs, lens):
            s.num_cached = n
        return self.model.logits(last).float()

    def _decode_buffered(self, seqs: list[Sequence], sampled: bool = False, after: PendingStep | None = None):
        """A decode step through the persistent buffers (and CUDA graphs): logits [B, V] float32, or `sampled`
        (the counter sampler in the step, `decode_tokens`) the sampled tokens and log-probs, or (`launch_decode`)
        the step's output [2, P] on the device, unread."""
        graphs, batch = self.decode_graphs, self.decode_batch
        assert graphs is not None and batch is not None
        graphs.wait_host_inputs()
        width, tables, temperature = batch.write(seqs, sampled, chained=after is not None)
        if self.record_routing:
            self.model.record_routing(True)
        try:
            out = graphs.run(len(seqs), width, sampled, tables, temperature, None if after is None else after.out)
            routing = self.model.recorded_routing() if self.record_routing else None  # [P, 1, M, K]
        finally:
            if self.record_routing:
                self.model.record_routing(False)
        if routing is not None:
            routing = routing[: len(seqs)].to(torch.int16).cpu()
            for b, s in enumerate(seqs):
                s.routing = [*s.routing, routing[b]]
        for s in seqs:
            s.num_cached += 1  # its fed token (chained: the one still to be appended from the step before)
        return out

    def decode_tokens(self, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """A decode step with the counter sampler (no filters) run on the device after it (in the same CUDA
        graph), each sequence drawing with its own temperature, seed and draw index: their next tokens and
        their log-probs. Needs the buffered or graphs path."""
        return self.launch_decode(seqs).result()

    def launch_decode(self, seqs: list[Sequence], after: PendingStep | None = None) -> PendingStep:
        """`decode_tokens` without waiting: the step is queued on the device and its tokens are read with
        `PendingStep.result()`. after: the step before, still unread (overlap): `seqs` are its sequences or some
        of them, each feeding the token it sampled there (taken on the device), and each sequence's
        `num_cached` counts that token already, one ahead of its `token_ids` until the host appends it."""
        if self.decode_graphs is None:
            raise RuntimeError("decode_tokens needs decode_path 'buffers' or 'graphs'")
        if after is not None and self.record_routing:
            raise RuntimeError("a chained decode step (overlap) cannot record routing: the experts are read per step")
        return PendingStep(list(seqs), self._decode_buffered(seqs, sampled=True, after=after), self.decode_graphs)
