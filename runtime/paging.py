"""The blocks of a paged KV cache: which sequence holds which, and a pool that grows as they do.

A paged cache (`model.kv_cache.layout.page_tokens` N > 0) keeps every layer's keys and values in
one pool of blocks of N positions. A sequence holds the blocks its length needs, in position
order (its row of the block table the kernels read); blocks are taken from a free list as the
sequence grows and go back when it ends, so sequences of different lengths share the pool
without each reserving the artifact's whole context. When the free list runs dry the pool grows
by half (the executor reallocates the caches and copies them: `grow`), so it never holds more
than about 1.5 times the blocks in use at its fullest, and copies each block a few times at most.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .errors import LlmcError


class BlockPool:
    def __init__(self, page_tokens: int, max_blocks: int, capacity: int, grow: Callable[[int], None]):
        self.page_tokens, self.max_blocks = page_tokens, max_blocks
        self.capacity, self._grow = capacity, grow
        self.free = list(range(capacity - 1, -1, -1))  # popped from the end: low blocks first
        self.held: dict[int, list[int]] = {}
        self.peak = 0  # the most blocks held at once

    def clear(self) -> None:
        """Every sequence ends: all blocks are free (the pool keeps its size)."""
        self.free = list(range(self.capacity - 1, -1, -1))
        self.held = {}

    def reserve(self, seq: int, length: int) -> None:
        """Blocks for positions 0..length-1 of sequence `seq` (it keeps those it holds)."""
        blocks = self.held.setdefault(seq, [])
        need = -(-length // self.page_tokens) - len(blocks)
        if need <= 0:
            return
        if need > len(self.free):
            self.ensure(max(self.capacity + self.capacity // 2 + 1, self.capacity + need - len(self.free)))
        blocks += [self.free.pop() for _ in range(need)]
        self.peak = max(self.peak, self.capacity - len(self.free))

    def ensure(self, capacity: int) -> None:
        """At least `capacity` blocks, allocated now (a server's pool, grown once at start)."""
        if capacity > self.capacity:
            self._grow(capacity)
            self.free[:0] = range(capacity - 1, self.capacity - 1, -1)
            self.capacity = capacity

    def release(self, seq: int) -> None:
        """Sequence `seq` ended: its blocks go back to the free list."""
        self.free += reversed(self.held.pop(seq, []))

    def table(self, seqs) -> np.ndarray:
        """The block table of sequences `seqs`, int32 [len(seqs), max_blocks]; slots past a
        sequence's blocks name block 0 (read, masked out by length, never weighed)."""
        out = np.zeros((len(seqs), self.max_blocks), np.int32)
        for row, seq in enumerate(seqs):
            blocks = self.held.get(seq, [])
            out[row, :len(blocks)] = blocks
        return out


def check_step(max_seq: int, reset_batch: int, pages: BlockPool | None, batch: int, seq: int, past: int) -> None:
    """A step the executors' caches and arena can hold: within the artifact's context; the batch
    they were reset for, or with a paged cache any part of it (sequences that are still going);
    and a paged batch's prefill one sequence at a time (the arena is planned for one sequence's
    prefill or the whole batch's decode step)."""
    if past + seq > max_seq:
        raise LlmcError(f"context of {past + seq} tokens exceeds the {max_seq} this artifact was compiled for")
    if reset_batch != batch and not (pages and batch <= reset_batch):
        raise LlmcError(f"the caches hold a batch of {reset_batch}, this step has {batch}")
    if pages and batch > 1 and seq > 1:
        raise LlmcError(f"a paged cache's batch prefills one sequence at a time (this step: {batch} "
                        f"sequences of {seq} tokens)")
