"""The decode step on a GPU: inputs in persistent device buffers, the step captured in CUDA graphs.

An eager decode step of a small model launches hundreds of small kernels, and on a GPU each launch costs
more than the work it does. As vLLM and nano-vllm do, the step (`CausalLM.decode_logits`: embed, every
layer over the paged latent pool through `model.kernels`, the LM head) is captured once per padded batch
size of a ladder, and each step then copies its inputs into the buffers the graph reads and replays it.

- Inputs live in one device buffer per kind (ids, positions, slots, lengths, block tables), sized for the
  largest batch, and in pinned host buffers of the same shapes that `DecodeBatch` (decode_batch.py) keeps
  from step to step; a step copies them host -> device (no sync). Rows past the real batch are padding:
  token 0 at position 0, written to and read from a scratch block that no sequence owns.
- Graphs are captured lazily, the first time a padded size is met, and all share one memory pool. Where the
  rows sample with the counter sampler and no filters, the sampler is in the graph too (`run(sampled=True)`),
  and a step's only device -> host copy is its tokens and their log-probs (`read_tokens`).
- Overlap (`Engine(overlap=True)`): a sampled step may be launched before the host has read the step before it.
  Its rows then take their input tokens from that step's output on the device (`run(after=...)`, by the
  `sources` row), the output is read back through one of two pinned buffers in turn (`start_read`), and the
  host waits for the last step's input copy before it rewrites the pinned inputs (`wait_host_inputs`).
- A graph reads the weights at the addresses they had when it was captured. At every `generate` the weights
  derived from the parameters (MLA's absorbed projections, stacked MLP weights) are remade in place, since an
  optimizer step may have moved the parameters (fused AdamW leaves no trace in their version counters); if a
  parameter's address changed (a new model, weights moved), the graphs are dropped and captured again on
  first use.
"""

from __future__ import annotations

import numpy as np
import torch

from model import CausalLM, LatentCache, kernels
from model.cache import PagedCacheView

# The int64 input rows, in order. sources: with overlap, the row of the step before whose sampled token a row feeds.
ROWS = ("ids", "positions", "slots", "lengths", "seeds", "draws", "greedy", "sources")
# Padded batch sizes: at most a third of a replay is padding, and few graphs to capture.
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def padded_size(batch: int) -> int:
    """The smallest ladder size >= batch (beyond the ladder: the next multiple of 256)."""
    for size in LADDER:
        if size >= batch:
            return size
    return -(-batch // 256) * 256


def weights_key(model: CausalLM) -> tuple[int, ...]:
    """Each parameter's address: changes when the weights move (a new model, `.to()`), not when they are
    stepped in place."""
    return tuple(p.data_ptr() for p in model.parameters())


class DecodeGraphs:
    """Runs decode steps of `model` over `cache` (paged in blocks of `block_size`) for up to `max_batch`
    sequences of up to `max_blocks` blocks each; block `scratch_block` is padding's."""

    def __init__(self, model: CausalLM, cache: LatentCache, block_size: int, max_batch: int, max_blocks: int,
                 scratch_block: int, capture: bool = True):
        self.model, self.cache, self.block_size = model, cache, block_size
        self.capture = capture  # False: the same buffers and step, run eagerly (CPU tests, debugging)
        self.max_batch = padded_size(max_batch)
        self.scratch_block = scratch_block
        device = cache.data.device
        B, W = self.max_batch, max_blocks
        # ids, positions, slots, lengths, then the sampler's seeds, draw indices and greedy flags: one int64 row
        # each, so one host -> device copy carries them all (and one more the temperatures).
        self.inputs = torch.zeros(len(ROWS), B, dtype=torch.int64, device=device)
        self.temperature = torch.ones(B, dtype=torch.float32, device=device)
        self.tables = torch.zeros(B, W, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self.host_inputs = torch.zeros(len(ROWS), B, dtype=torch.int64, pin_memory=pin)
        self.host_temperature = torch.ones(B, dtype=torch.float32, pin_memory=pin)
        self.host_tables = torch.zeros(B, W, dtype=torch.int32, pin_memory=pin)
        # NumPy views of the same host memory: rows are written from Python lists at NumPy's speed, not torch's
        self.host_rows, self.host_table_rows = self.host_inputs.numpy(), self.host_tables.numpy()
        self.host_temperature_row = self.host_temperature.numpy()
        self.padding = np.array([0, 0, scratch_block * block_size, 1, 0, 0, 1, 0])[:, None]
        # A sampled step's [2, P] read back (on CUDA): two buffers used in turn, so that with overlap the step in
        # flight copies into one while the host reads the step before from the other.
        self.host_out = torch.zeros(2, 2 * B, dtype=torch.float64, pin_memory=pin)
        self.out_turn = 0
        self.inputs_copied: torch.cuda.Event | None = None  # recorded after a step's host -> device copies
        # (padded size, sampled?) -> the graph and its output: logits [P, V], or [2, P] tokens and log-probs
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.key: tuple[int, ...] | None = None
        self.captures = 0  # graphs captured over this object's life (a test and the bench read it)

    def refresh(self) -> None:
        """Before a generate: the derived weights remade in place from the parameters as they are now, and the
        graphs dropped if a parameter moved since they were captured."""
        key = weights_key(self.model)
        if key != self.key:
            self.graphs.clear()
            self.pool = None
            self.key = key
        self.model.refresh_derived_weights()

    def captured(self, batch: int) -> tuple[torch.cuda.CUDAGraph, bool] | None:
        """The graph a decode step of `batch` sequences replays (the one with the sampler where both were
        captured) and whether it samples; None before one was captured (benchmarks time its replay alone)."""
        keys = [key for key in self.graphs if key[0] == padded_size(batch)]
        if not keys:
            return None
        key = max(keys)  # (size, True) over (size, False)
        return self.graphs[key][0], key[1]

    def view(self, size: int, width: int | None = None) -> PagedCacheView:
        """The paged view over the buffers' first `size` rows and `width` table columns (all: a graph's shape is
        fixed, and the Triton kernel reads only up to each length; an uncaptured step on a CPU passes the
        batch's width, since the PyTorch reference gathers every column)."""
        tables = self.tables[:size, :width]
        return PagedCacheView(self.cache, self.inputs[2, :size, None], None,  # type: ignore[arg-type]
                              block_tables=tables, lengths=self.inputs[3, :size], block_size=self.block_size,
                              max_length=tables.shape[1] * self.block_size)

    def _step(self, size: int, sampled: bool, width: int | None = None) -> torch.Tensor:
        """The captured computation: logits [size, V], or with the sampler [2, size] (tokens, log-probs) as float64."""
        logits = self.model.decode_logits(self.inputs[0, :size], self.inputs[1, :size], self.view(size, width))
        if not sampled:
            return logits
        tokens, logprobs = kernels.counter_sample(logits, self.temperature[:size], self.inputs[4, :size],
                                                  self.inputs[5, :size], self.inputs[6, :size] != 0)
        return torch.stack([tokens.double(), logprobs.double()])

    def run(self, batch: int, width: int, sampled: bool, tables: bool = True, temperature: bool = True,
            after: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of the `batch` sequences whose inputs are in the host buffers' first rows (written by
        `DecodeBatch`: ids, positions, slots, lengths, and with `sampled` the sampler's rows and temperatures;
        block tables `width` columns wide). Pads the rest of the padded size, copies them to the device buffers
        (the tables and temperatures only when `tables`, `temperature`: False when the device's are the same as
        the last step's) and runs the step (replays its graph). Returns logits [batch, V] float32, or with
        `sampled` the [2, padded size] tokens and log-probs (float64) for `read_tokens`; a view of the graph's
        output, valid until the next step.

        after: the sampled output [2, P'] of the step before, not yet read by the host (overlap): row b's input
        token is the one row `sources[b]` sampled there, gathered on the device (the host's ids row is stale)."""
        if self.max_batch < batch:
            raise ValueError(f"a decode step of {batch} sequences, but the graphs were sized for {self.max_batch}")
        if width > self.tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks, but the graphs were sized for {self.tables.shape[1]}")
        size = padded_size(batch)
        # padding: token 0 at position 0, in the scratch block; a greedy draw
        self.host_rows[:, batch:size] = self.padding
        self.host_table_rows[batch:size, 0] = self.scratch_block
        self.inputs[:, :size].copy_(self.host_inputs[:, :size], non_blocking=True)
        if tables:
            self.tables[:size, :width].copy_(self.host_tables[:size, :width], non_blocking=True)
        if sampled and temperature:
            self.host_temperature_row[batch:size] = 1.0
            self.temperature[:size].copy_(self.host_temperature[:size], non_blocking=True)
        if self.inputs.device.type == "cuda":
            self.inputs_copied = torch.cuda.Event()
            self.inputs_copied.record()
        if after is not None:
            self.inputs[0, :batch] = after[0].long()[self.inputs[7, :batch]]
        if not self.capture:
            out = self._step(size, sampled, width)
        else:
            key = (size, sampled)
            if key not in self.graphs:
                self.graphs[key] = self._capture(size, sampled)
            graph, out = self.graphs[key]
            graph.replay()
        return out if sampled else out[:batch]

    def wait_host_inputs(self) -> None:
        """Blocks until the last step's host -> device input copies ran, so the pinned inputs may be rewritten
        (with overlap that step may still be queued behind the one before; otherwise it has long run)."""
        if self.inputs_copied is not None:
            self.inputs_copied.synchronize()

    def start_read(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Starts a sampled step's one device -> host copy: its output [2, P], whole and contiguous (no gather on
        the device first), into the next pinned buffer. Returns that host tensor and the event to wait on before
        reading it (on a CPU the output itself, read where it is, and None)."""
        if out.device.type == "cpu":
            return out, None
        self.out_turn ^= 1
        host = self.host_out[self.out_turn, : out.numel()].view(out.shape)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def tokens_of(host: torch.Tensor, batch: int) -> tuple[list[int], list[float]]:
        """A read-back output [2, P] -> the first `batch` rows' tokens and log-probs."""
        return host[0, :batch].long().tolist(), host[1, :batch].tolist()

    def read_tokens(self, out: torch.Tensor, batch: int) -> tuple[list[int], list[float]]:
        """A sampled step's output [2, P] -> the first `batch` rows' tokens and log-probs (`start_read`, waited on)."""
        host, event = self.start_read(out)
        if event is not None:
            event.synchronize()
        return self.tokens_of(host, batch)

    def _capture(self, size: int, sampled: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (Triton compiles, derived weights are made), then capture. The warm-up
        writes the current step's latents to the cache: the same values the replay writes."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(size, sampled)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(size, sampled)
        self.pool = graph.pool()
        self.captures += 1
        return graph, out
