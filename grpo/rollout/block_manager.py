"""The paged latent KV cache's bookkeeping: a pool of fixed-size blocks with reference counts, so the G
samples of a group share their prompt's blocks and copy a shared, partly filled block only when they
write to it (copy on write). It never touches tensors: copies are returned for the runner to make."""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.blocks_allocated = 0  # blocks ever handed out: what prefix sharing saves shows here

    # ----- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- allocation -----------------------------------------------------------------------------
    def _take(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_count[block] == 0
        self.ref_count[block] = 1
        self.blocks_allocated += 1
        return block

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Gives `seq` blocks for its first `num_tokens` tokens (those it holds already are kept)."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            raise MemoryError(f"{need} blocks needed, {self.num_free} free")
        seq.block_table.extend(self._take() for _ in range(max(need, 0)))

    def blocks_to_extend(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` needs before its tokens up to `num_tokens` can be fed: the new blocks past its table,
        plus a private copy of the block its first uncached token lands in when another sequence shares it
        (a sequence resumed after a tool call keeps its blocks; a new one holds none)."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        index = seq.num_cached // self.block_size
        shared = index < len(seq.block_table) and self.ref_count[seq.block_table[index]] > 1
        return max(need, 0) + int(shared)

    def extend(self, seq: Sequence, num_tokens: int) -> tuple[int, int] | None:
        """`allocate`, after copying the shared block (if any) that its first uncached token is written to.
        Returns that copy (src, dst) for the runner to make, else None."""
        copy = None
        index = seq.num_cached // self.block_size
        if index < len(seq.block_table) and self.ref_count[seq.block_table[index]] > 1:
            copy = self.prepare_append(seq)
        self.allocate(seq, num_tokens)
        return copy

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks."""
        for block in parent.block_table:
            self.ref_count[block] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []

    def growing(self, seqs: list[Sequence]) -> list[Sequence]:
        """Those of `seqs` that need a block before their next token's latent is written: a new one when the
        token starts a block, or a private copy when it lands in a block another sequence shares (one pass, so
        a decode step prepares only them)."""
        bs, ref, out = self.block_size, self.ref_count, []
        for seq in seqs:
            index, table = seq.num_cached // bs, seq.block_table
            if index >= len(table) or ref[table[index]] > 1:
                out.append(seq)
        return out

    def prepare_append(self, seq: Sequence) -> tuple[int, int] | None:
        """Makes the slot for `seq`'s next token writable. Returns (src, dst) when a shared block was
        copied (the runner copies the cache contents), else None."""
        position = seq.num_cached
        index = position // self.block_size
        if index >= len(seq.block_table):
            seq.block_table.append(self._take())
            return None
        block = seq.block_table[index]
        if self.ref_count[block] == 1:
            return None
        new = self._take()
        self.ref_count[block] -= 1
        seq.block_table[index] = new
        return block, new
