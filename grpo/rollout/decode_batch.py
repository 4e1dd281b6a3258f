"""A decode step's inputs, kept in the decode graphs' pinned host buffers from one step to the next (a persistent
batch, as vLLM's): while a step runs the same sequences as the last one, or some of them, only what moved is
written.

From one decode step to the next, each sequence still running has exactly one new token, its position and draw
index advance by one, and its block table changes only when that token starts a block (`BlockManager.
prepare_append` appended one; a copy on write or a prefill in between makes the runner `forget` the batch, so
every other change of a table comes with a full rewrite). Sequences that left (finished, preempted, paused for a
tool) take their rows with them: the rest are gathered to the front in one NumPy operation per buffer. The rows
that are rewritten every step (ids, slots) are one NumPy operation each, not a Python loop over the sequences.

With overlap (`Engine(overlap=True)`) a step is written before the host has the tokens the last step sampled: it
must be the last step's sequences or some of them, each row names the last step's row it follows (`sources`),
and the device takes the ids from there."""

from __future__ import annotations

from itertools import chain

import numpy as np

from .cuda_graphs import DecodeGraphs
from .sequence import Sequence


def check_one_new_token(seqs: list[Sequence]) -> None:
    """A decode step feeds each sequence exactly its one uncached token."""
    if any(s.num_tokens - s.num_cached != 1 for s in seqs):
        raise RuntimeError("a decode step feeds exactly one uncached token per sequence")


def write_block_tables(seqs: list[Sequence], out: np.ndarray) -> int:
    """Writes each sequence's block table into a row of `out` [>= B, >= W], padded with block 0 to the longest
    table (one NumPy assignment, not a row at a time). Returns that width, W."""
    lengths = np.fromiter(map(len, (s.block_table for s in seqs)), np.int64, len(seqs))
    width = int(lengths.max())
    tables = out[: len(seqs), :width]
    tables[:] = 0
    tables[np.arange(width) < lengths[:, None]] = np.fromiter(chain.from_iterable(s.block_table for s in seqs),
                                                              out.dtype, int(lengths.sum()))
    return width


class DecodeBatch:
    """Writes decode steps into `graphs`' host buffers (`DecodeGraphs.run` pads, copies and runs them)."""

    def __init__(self, graphs: DecodeGraphs, block_size: int):
        self.block_size = block_size
        self.rows = graphs.host_rows  # [ROWS, P] int64: ids, positions, slots, lengths, seeds, draws, greedy, sources
        self.tables = graphs.host_table_rows  # [P, W] int32
        self.temperature = graphs.host_temperature_row  # [P] float32
        self.index = np.arange(self.rows.shape[1])
        self.seqs: list[Sequence] = []  # the last step's sequences, row by row
        self.sampled = False  # whether the sampler's rows hold them
        self.width = 0  # block table columns written

    def forget(self) -> None:
        """The next step rewrites every row (a new generate, a prefill or a copy on write came in between)."""
        self.seqs = []

    def write(self, seqs: list[Sequence], sampled: bool, chained: bool = False) -> tuple[int, bool, bool]:
        """Writes a decode step of `seqs` (one uncached token each) into rows [:len(seqs)], with the sampler's
        inputs when `sampled`. Returns the block tables' width (the longest table) and whether the tables and
        the temperatures changed since the last step (else the device buffers still hold them: no copy).

        chained: the last step's tokens are not read yet (overlap): `seqs` must be its sequences or some of them,
        whose input is the token they sampled there; the `sources` row says in which of its rows."""
        if sampled == self.sampled and len(seqs) == len(self.seqs) and seqs == self.seqs:  # the same objects
            changed = self._advance(seqs, chained)
            if chained:
                self.rows[7, : len(seqs)] = self.index[: len(seqs)]
            return self.width, changed, False
        kept = self._rows_of(seqs) if sampled == self.sampled else None
        if kept is not None:  # some of the last step's sequences left
            self._keep(kept)
            self.seqs = list(seqs)
            self._advance(seqs, chained)
            if chained:
                self.rows[7, : len(seqs)] = kept
            return self.width, True, sampled
        if chained:
            raise RuntimeError("a decode step chained to the last one (overlap) must run its sequences or some of them")
        self._rewrite(seqs, sampled)
        self.seqs, self.sampled = list(seqs), sampled
        return self.width, True, sampled

    def _rows_of(self, seqs: list[Sequence]) -> np.ndarray | None:
        """Each sequence's row in the last step, when all of `seqs` were in it (and fewer than it held); else None."""
        if not seqs or len(seqs) >= len(self.seqs):
            return None
        row = {id(s): r for r, s in enumerate(self.seqs)}  # the last step's sequences are alive: ids are theirs
        rows = [row.get(id(s), -1) for s in seqs]
        return None if -1 in rows else np.array(rows)

    def _keep(self, rows: np.ndarray) -> None:
        """The last step's rows `rows`, gathered to the front in their new order."""
        B = len(rows)
        self.rows[:, :B] = self.rows[:, rows]
        self.tables[:B, : self.width] = self.tables[rows, : self.width]
        self.temperature[:B] = self.temperature[rows]

    def _rewrite(self, seqs: list[Sequence], sampled: bool) -> None:
        check_one_new_token(seqs)
        B, rows, bs = len(seqs), self.rows, self.block_size
        rows[0, :B] = [s.token_ids[-1] for s in seqs]
        positions = rows[1, :B]
        positions[:] = [s.num_cached for s in seqs]  # the new token's
        rows[3, :B] = positions + 1
        self.width = write_block_tables(seqs, self.tables)
        rows[2, :B] = self.tables[self.index[:B], positions // bs] * bs + positions % bs
        if sampled:
            self.temperature[:B] = [s.params.temperature if s.params.temperature > 0 else 1.0 for s in seqs]
            rows[4, :B] = [s.seed or 0 for s in seqs]
            rows[5, :B] = rows[3, :B] - [s.prompt_len for s in seqs]  # the index of the token it draws
            rows[6, :B] = [s.params.greedy for s in seqs]

    def _advance(self, seqs: list[Sequence], chained: bool = False) -> bool:
        """The last step's sequences (or those still running, gathered to the front), one token further (their
        ids from the host, unless `chained`: from the last step's output on the device). Returns whether a block
        table changed."""
        B, rows, bs = len(seqs), self.rows, self.block_size
        if not chained:
            rows[0, :B] = [s.token_ids[-1] for s in seqs]
        positions = rows[1, :B]
        positions += 1
        rows[3, :B] = positions + 1
        if self.sampled:
            rows[5, :B] += 1
        column = positions // bs
        width = int(column.max()) + 1  # the longest table (one that left may have been the longest)
        changed = width != self.width
        if width > self.width:
            self.tables[:B, self.width:width] = 0
        self.width = width
        for b in np.flatnonzero(positions % bs == 0).tolist():  # the token starts a block: its table grew
            changed = True
            table, c = seqs[b].block_table, int(column[b])
            if len(table) != c + 1:
                raise RuntimeError(f"{seqs[b]}: a table of {len(table)} blocks at position {positions[b]}; its "
                                   "table changed without the runner forgetting the batch")
            self.tables[b, c] = table[c]
        rows[2, :B] = self.tables[self.index[:B], column] * bs + positions % bs
        return changed
