"""Decides what runs each step: admit waiting sequences (a prefill) while blocks and batch room last,
otherwise decode every running sequence; when the pool runs dry, preempt the newest running sequences
(their blocks freed, recomputed later). A sequence paused for a tool call leaves the running set with its
blocks and comes back through the waiting queue: only its new tokens are prefilled. Never touches tensors."""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        """-> (sequences to run, whether it is a prefill, block copies to make first)."""
        batch, copies = self._admit()
        if batch:
            return batch, True, copies
        return self._prepare_decode()

    def _admit(self) -> tuple[list[Sequence], list[tuple[int, int]]]:
        batch: list[Sequence] = []
        copies: list[tuple[int, int]] = []
        seats = len(self.running)
        longest = 0
        while self.waiting:
            seq = self.waiting[0]
            fan_out = max(1, len(seq.fan_out))
            # The blocks its uncached tokens need (the prompt's, or a resumed sequence's new ones), plus one
            # per sample for its first own block (copy on write or a new one).
            need = self.blocks.blocks_to_extend(seq, seq.num_tokens) + fan_out
            uncached = seq.num_tokens - seq.num_cached
            longest = max(longest, uncached)
            too_many = seats + fan_out > self.max_num_seqs
            too_long = batch and longest * (len(batch) + 1) > self.max_prefill_tokens
            if too_many or too_long or need > self.blocks.num_free:
                if not batch and not self.running and need > self.blocks.num_free:
                    if self._evict_waiting(seq):  # a paused sequence's blocks, recomputed later
                        continue
                    raise MemoryError(f"a sequence of {seq.num_tokens} tokens x {fan_out} samples needs {need} "
                                      f"blocks; the pool has {self.blocks.num_free} free of {self.blocks.num_blocks}")
                break
            self.waiting.popleft()
            copy = self.blocks.extend(seq, seq.num_tokens)
            if copy is not None:
                copies.append(copy)
            seq.status = Status.RUNNING
            batch.append(seq)
            seats += fan_out
        return batch, copies

    def _evict_waiting(self, keep: Sequence | None) -> bool:
        """Frees the blocks of the last waiting sequence that holds any (other than `keep`); False if none."""
        holder = next((s for s in reversed(self.waiting) if s is not keep and s.block_table), None)
        if holder is None:
            return False
        self.blocks.free(holder)
        holder.num_cached = 0
        self.num_preemptions += 1
        return True

    def decodes_running_as_is(self) -> bool:
        """Whether the next `schedule` is a decode of the running sequences that admits none, preempts none and
        copies no block: what a step launched before the last step's tokens are read needs (overlap). A waiting
        sequence with a seat free counts as admitted."""
        if self.waiting and len(self.running) + max(1, len(self.waiting[0].fan_out)) <= self.max_num_seqs:
            return False
        growing = self.blocks.growing(self.running)
        bs = self.blocks.block_size
        return len(growing) <= self.blocks.num_free and all(s.num_cached // bs >= len(s.block_table) for s in growing)

    def _prepare_decode(self) -> tuple[list[Sequence], bool, list[tuple[int, int]]]:
        while len(growing := self.blocks.growing(self.running)) > self.blocks.num_free:
            if len(self.running) == 1:
                if self._evict_waiting(None):  # paused sequences hold the blocks it needs
                    continue
                raise MemoryError(f"{self.running[0]} cannot grow: the pool of {self.blocks.num_blocks} blocks is too small")
            self.preempt(self.running.pop())
        copies = [c for s in growing if (c := self.blocks.prepare_append(s)) is not None]
        return list(self.running), False, copies

    def preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks; it waits at the front of the queue to be recomputed from its tokens."""
        self.blocks.free(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def pause(self, seq: Sequence) -> None:
        """Takes `seq` out of the running set while a tool runs; it keeps its blocks and cached tokens."""
        self.running.remove(seq)
        seq.status = Status.WAITING

    def resume(self, seq: Sequence) -> None:
        """`seq` (paused, its tool output appended) waits at the front to have its new tokens prefilled."""
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.blocks.free(seq)
        if seq in self.running:
            self.running.remove(seq)
