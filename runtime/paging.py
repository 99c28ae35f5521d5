"""The blocks of a paged KV cache: which sequence holds which, and a pool that grows as they do.

A paged cache (`model.kv_cache.layout.page_tokens` N > 0) keeps every layer's keys and values in
one pool of blocks of N positions. A sequence holds the blocks its length needs, in position
order (its row of the block table the kernels read); blocks are taken from a free list as the
sequence grows and go back when it ends, so sequences of different lengths share the pool
without each reserving the artifact's whole context. When the free list runs dry the pool grows
by half (the executor reallocates the caches and copies them: `grow`), so it never holds more
than about 1.5 times the blocks in use at its fullest, and copies each block a few times at most.

Prefix reuse (a server's): a full block's keys and values depend only on its tokens and those
before it, and the kernels compute them to the same bits in any batch, so a block one sequence
filled can serve another that starts with the same tokens (`register`, `share`), held by both
(reference counts). A released block that a prefix still names stays cached in the free list,
taken last, until a new block is needed.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Callable

import numpy as np

from .errors import LlmcError


class BlockPool:
    def __init__(self, page_tokens: int, max_blocks: int, capacity: int, grow: Callable[[int], None]):
        self.page_tokens, self.max_blocks = page_tokens, max_blocks
        self.capacity, self._grow = capacity, grow
        self.held: dict[int, list[int]] = {}
        self.peak = 0  # the most blocks held at once
        self.clear()

    def clear(self) -> None:
        """Every sequence ends: all blocks are free (the pool keeps its size), none cached."""
        self.free = list(range(self.capacity - 1, -1, -1))  # popped from the end: low blocks first
        self.held = {}
        self.refs: dict[int, int] = {}  # block -> the sequences holding it (a shared prefix: several)
        self.prefixes: dict[bytes, int] = {}  # the digest of a full block's tokens and all before -> block
        self.digest_of: dict[int, bytes] = {}
        self.chains: dict[int, list[bytes]] = {}  # sequence -> the digests of its first full blocks

    def in_use(self) -> int:
        """Blocks some sequence holds (a shared one once)."""
        return len(self.refs)

    def reserve(self, seq: int, length: int) -> None:
        """Blocks for positions 0..length-1 of sequence `seq` (it keeps those it holds)."""
        blocks = self.held.setdefault(seq, [])
        need = -(-length // self.page_tokens) - len(blocks)
        if need <= 0:
            return
        if need > len(self.free):
            self.ensure(max(self.capacity + self.capacity // 2 + 1, self.capacity + need - len(self.free)))
        for _ in range(need):
            block = self.free.pop()
            self._forget(block)  # a cached prefix's block, least recently used: its keys are overwritten
            self.refs[block] = 1
            blocks.append(block)
        self.peak = max(self.peak, self.in_use())

    def ensure(self, capacity: int) -> None:
        """At least `capacity` blocks, allocated now (a server's pool, grown once at start)."""
        if capacity > self.capacity:
            self._grow(capacity)
            self.free[:0] = range(capacity - 1, self.capacity - 1, -1)
            self.capacity = capacity

    def release(self, seq: int) -> None:
        """Sequence `seq` ended: the blocks no other sequence holds go back to the free list; those
        of a cached prefix at its front, taken last (least recently used first)."""
        self.chains.pop(seq, None)
        for block in reversed(self.held.pop(seq, [])):
            self.refs[block] -= 1
            if not self.refs[block]:
                del self.refs[block]
                if block in self.digest_of:
                    self.free.insert(0, block)
                else:
                    self.free.append(block)

    # -- prefix reuse: a full block's keys and values depend on its tokens and all before them only

    def register(self, seq: int, tokens, cached: int) -> None:
        """The full blocks of sequence `seq`'s first `cached` tokens (of `tokens`, in position
        order) can serve a later sequence that starts with the same tokens."""
        chain, blocks, n = self.chains.setdefault(seq, []), self.held.get(seq, []), self.page_tokens
        for i in range(len(chain), min(cached // n, len(blocks))):
            chain.append(_digest(chain[-1] if chain else b"", tokens[i * n:(i + 1) * n]))
            if chain[-1] not in self.prefixes and blocks[i] not in self.digest_of:
                self.prefixes[chain[-1]] = blocks[i]
                self.digest_of[blocks[i]] = chain[-1]

    def share(self, seq: int, tokens, limit: int) -> int:
        """Sequence `seq`, holding nothing yet, starts with the cached blocks of the longest
        prefix of `tokens` that whole blocks hold, at most `limit` tokens; returns how many tokens
        they hold (the positions its first step starts at)."""
        chain, blocks, n = [], [], self.page_tokens
        for i in range(limit // n):
            digest = _digest(chain[-1] if chain else b"", tokens[i * n:(i + 1) * n])
            block = self.prefixes.get(digest)
            if block is None:
                break
            chain.append(digest)
            blocks.append(block)
        for block in blocks:
            if block not in self.refs:
                self.free.remove(block)
            self.refs[block] = self.refs.get(block, 0) + 1
        self.held[seq], self.chains[seq] = blocks, chain
        self.peak = max(self.peak, self.in_use())
        return len(blocks) * n

    def _forget(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None:
            del self.prefixes[digest]

    def table(self, seqs) -> np.ndarray:
        """The block table of sequences `seqs`, int32 [len(seqs), max_blocks]; slots past a
        sequence's blocks name block 0 (read, masked out by length, never weighed)."""
        out = np.zeros((len(seqs), self.max_blocks), np.int32)
        for row, seq in enumerate(seqs):
            blocks = self.held.get(seq, [])
            out[row, :len(blocks)] = blocks
        return out


def _digest(before: bytes, tokens) -> bytes:
    """A block's identity: its tokens and the digest of all before them (blake2b: two different
    prefixes with one digest would be a wrong answer, not a slow one)."""
    return hashlib.blake2b(before + array("q", tokens).tobytes(), digest_size=16).digest()


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
