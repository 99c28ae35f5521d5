"""The executor core every device shares: a compiled plan's memory (weights, KV caches, the
activation arena), the paged cache's pool, and the steps of a run, over a small device interface.

The plan (from the artifact) lists kernel calls by value name; `values` gives each value's dtype
and shape, whose dims are integers or polynomials over the named dims (batch, seq, past, total,
blocks), encoded as [[coefficient, [dim, ...]], ...]. The weights go to the device once
(`Device.upload`; the CPU's uses them in place). `reset` allocates the KV caches and one arena
for the activations, planned by lifetime (`memory.py`): values never alive together share its
bytes, each at an offset the device can address. Each layer's keys and values live in one buffer
[batch, kv_heads, max_seq, head_dim] that `rope_cache` writes in place and attention reads; a
paged cache's in a pool of blocks (`paging.py`) that any batch up to the one it was reset for
shares, each sequence at its own length, grown (its blocks copied to the front of a larger pool)
as the sequences grow.

What differs between devices is how feeds go in, kernels are called and logits come out (`_step`):
the CPU's libllmc calls take tensors viewed at the plan's shapes (`host.py`), the CUDA driver
takes pointers and replays decode steps as graphs (`cuda.py`), OpenCL and Metal launch the
kernel groups TVM lowered each function to (`gpu.py`). None of them reshapes an argument by op
kind: a step says how its kernel sees each argument (`views`). (The one use of a step's kind is
the CPU's last-position logits: a GEMM computes each row alone.)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from . import memory
from .errors import LlmcError
from .paging import BlockPool, check_step


class Device(Protocol):
    """The memory the core manages; how feeds go in and logits come out is each executor's."""

    align: int  # the byte alignment of a buffer offset the device can address

    def alloc(self, nbytes: int, zero: bool = False):
        """A device buffer of `nbytes` (at least 4), zeroed when asked."""

    def upload(self, array: np.ndarray):
        """A device buffer holding `array`."""

    def view(self, buffer, offset: int, nbytes: int):
        """`nbytes` (> 0) of `buffer` from `offset` (a multiple of `align`), as kernels take buffers."""

    def copy(self, source, target, nbytes: int) -> None:
        """`source`'s first `nbytes` into `target`, after everything enqueued before."""

    def available(self) -> int | None:
        """Bytes of host memory the device can still give (its buffers are host memory), or None."""


class Executor:
    """A plan's memory and steps on `device`. `last_only`: the arena holds one position's logits
    (an executor that writes a prefill's every position to an array of the caller's)."""

    def __init__(self, device: Device, manifest: dict, weights: dict[str, np.ndarray], last_only: bool = False):
        self.device = device
        self.manifest, self.plan = manifest, manifest["plans"]["forward"]
        self.values = manifest["plans"]["values"]
        self.max_seq = manifest["model"]["max_seq_len"]
        self.logits = manifest["model"]["roles"]["logits"]
        self.kv_entries = manifest["model"]["kv_cache"]["entries"]
        self.page_tokens = manifest["model"]["kv_cache"]["layout"]["page_tokens"]
        self.last_only = last_only
        self.dummy = device.alloc(4)  # for a slot a kernel leaves unread ("") and empty values
        self.weight_names = {name for name in weights if name in self.values}
        self.buffers = {name: device.upload(weights[name]) if weights[name].size else self.dummy
                        for name in self.weight_names}
        self.buffers[""] = self.dummy
        self.caches: dict[str, tuple] = {}  # {past: (buffer, bytes)}
        self.cache_env: dict[str, int] = {}  # the dims the caches are allocated at
        self.batch = None
        self.pages: BlockPool | None = None

    def reset(self, batch: int) -> None:
        """Caches and arena for a new batch of sequences. The caches start empty: a step reads
        only the positions before its `past`, so buffers of the same batch size are kept
        (allocated and bound once, as a server would). A paged cache's pool (`pages`) keeps its
        blocks, all free again; it starts with a block per sequence and grows as they do."""
        if batch == self.batch:
            if self.pages:
                self.pages.clear()
            return
        align = max(memory.ALIGN, self.device.align)
        offsets, sizes, size = memory.arena_plan(self.manifest, self.weight_names, batch, align, self.last_only)
        page = self.page_tokens
        self.pages = BlockPool(page, -(-self.max_seq // page), batch, self._grow) if page else None
        self._check_memory(memory.cache_bytes(self.manifest, batch, batch if page else None) + size,
                           f"a batch of {batch} at the artifact's context of {self.max_seq} tokens")
        self.batch = batch
        self.caches = {}
        self._allocate_caches(batch)
        self.arena = self.device.alloc(size)
        self.buffers.update({name: self.device.view(self.arena, offset, sizes[name]) if sizes[name] else self.dummy
                             for name, offset in offsets.items()})
        self._unbind()

    def _allocate_caches(self, blocks: int) -> None:
        """The KV caches for the batch (a paged pool of `blocks` blocks), replacing the ones
        before, whose contents go to their front (a pool that grows). A paged pool starts zeroed:
        the kernels read (and mask out) slots no token was written to, and a zero weight times
        garbage could be NaN."""
        self.cache_env = {"batch": self.batch, "past": self.max_seq, "blocks": blocks}
        for entry in self.kv_entries:
            nbytes = memory.nbytes(self.values[entry["past"]], self.cache_env)
            cache = self.device.alloc(nbytes, zero=bool(self.pages))
            if entry["past"] in self.caches:
                old, old_bytes = self.caches[entry["past"]]
                self.device.copy(old, cache, min(old_bytes, nbytes))
            self.caches[entry["past"]] = (cache, nbytes)
            self.buffers[entry["past"]] = self.buffers[entry["present"]] = cache

    def _grow(self, blocks: int) -> None:
        """A paged cache's pool grows to `blocks` blocks (`paging.BlockPool`); calls bind anew."""
        self._check_memory(memory.cache_bytes(self.manifest, self.batch, blocks),
                           f"a KV cache of {blocks} blocks of {self.pages.page_tokens} tokens")
        self._allocate_caches(blocks)
        self._unbind()

    def _check_memory(self, need: int, what: str) -> None:
        free = self.device.available()
        if free is not None and need > free:
            raise LlmcError(f"{what} needs {need / 2**30:.2f} GiB for its KV caches and activations; this "
                            f"machine has {free / 2**30:.2f} GiB free")

    def _unbind(self) -> None:
        """Forget what was prepared over the old buffers (bound calls, captured graphs)."""

    def run(self, feeds: dict[str, np.ndarray], batch: int, seq: int, past: int, rows=None,
            **options) -> np.ndarray:
        """One forward step of `seq` new tokens in each of `batch` sequences over `feeds` (the
        token ids, and the mask and positions where the model takes them; no past: the caches
        hold it); `options` are the executor's (`last_logits`: the last position's logits
        only). Returns the logits, an array the caller owns (or one the executor reuses, as
        its docstring says). With `rows` (a step of one token per sequence), the logits of
        those sequences only, [len(rows), vocab], in an array the caller owns."""
        check_step(self.max_seq, self.batch, self.pages, batch, seq, past)
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        if rows is not None:
            if seq != 1:
                raise LlmcError(f"logits of some rows: a step of one token per sequence, not {seq}")
            return self._step_rows(feeds, env, rows)
        return self._step(feeds, env, **options)

    def _step(self, feeds: dict[str, np.ndarray], env: dict[str, int], **options) -> np.ndarray:
        raise NotImplementedError

    def _step_rows(self, feeds: dict[str, np.ndarray], env: dict[str, int], rows) -> np.ndarray:
        """`run` with `rows`: here every row's logits, then those asked for (the CPU's computes
        only those)."""
        return np.array(self._step(feeds, env)[rows, -1])
