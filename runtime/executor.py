"""Run a compiled plan: kernel calls over value buffers, with the KV caches owned here.

The plan (from the artifact) lists kernel calls by value name; `values` gives each value's dtype
and shape, whose dims are integers or polynomials over the named dims (batch, seq, past,
total), encoded as [[coefficient, [dim, ...]], ...]. The weights are used in place, as views on
the artifact's weights file read into memory (64-byte aligned by the writer). `reset` allocates the KV caches and
one arena for the activations, planned by lifetime (`memory.py`): values never alive together
share its bytes. Each value is viewed at a step's shape from the front of its place in the
arena, so a step allocates no tensor memory. The kernel calls are bound once per (batch, seq):
argument arrays are prepared then, and a decode step only re-views the few values whose shape
grows with the context (the mask) and passes the current lengths. Each layer's keys and values
live in one buffer [batch, kv_heads, max_seq, head_dim] that `rope_cache` writes in place and
attention reads; a paged cache's in a pool of blocks (`paging.py`) that any batch up to the
one it was reset for shares, each sequence at its own length.

TVM kernels read 64-byte aligned memory; every buffer here is so aligned.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import numpy as np

from . import memory
from .dims import atom, evaluate, names
from .errors import LlmcError
from .memory import ALIGN
from .kernels import KernelRefused
from .paging import BlockPool, check_step


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def _aligned(a: np.ndarray) -> np.ndarray:
    """`a` itself when the kernels can read it in place, else an aligned copy."""
    if a.ctypes.data % ALIGN == 0 and a.flags.c_contiguous and a.flags.writeable:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


class Call(NamedTuple):
    """One plan step, bound for a (batch, seq): the kernel's name, its argument arrays (the
    growing ones as at the bind), {position: maker} of the arguments re-viewed at each run, copies
    (destination, source) before the call, its named dims, whether they are the last
    position's."""
    kernel: str
    args: list
    growing: dict
    copies: list
    dims: list
    last: bool


class Functions:
    """Kernels as Python callables (Triton's interpreter), called one by one; `bind` and the
    calls' `run` are what kernels.KernelLibrary offers for a CPU artifact's library."""

    def __init__(self, functions: dict[str, Callable]):
        self.functions = functions

    def bind(self, calls: list[Call]) -> "FunctionCalls":
        return FunctionCalls(self.functions, calls)


class FunctionCalls:
    def __init__(self, functions: dict, calls: list[Call]):
        self.calls = [(functions[c.kernel], c) for c in calls]

    def run(self, env: dict, last_env: dict, seconds: np.ndarray | None = None) -> None:
        for i, (fn, c) in enumerate(self.calls):
            args = list(c.args)
            for j, make in c.growing.items():
                args[j] = make(env)
            for dst, src in c.copies:
                dst[...] = src
            start = time.perf_counter()
            try:
                fn(*args, *[atom(d, last_env if c.last else env) for d in c.dims])
            except Exception as e:  # a kernel checks its arguments
                raise KernelRefused(i, str(e).strip().splitlines()[-1]) from None
            if seconds is not None:
                seconds[i] += time.perf_counter() - start


class Executor:
    def __init__(self, kernels, manifest: dict, weights: dict[str, np.ndarray]):
        """`kernels`: kernels.KernelLibrary (a CPU artifact's) or Functions (Python callables)."""
        self.kernels, self.manifest = kernels, manifest
        self.plan, self.values = manifest["plans"]["forward"], manifest["plans"]["values"]
        self.max_seq = manifest["model"]["max_seq_len"]
        self.logits = manifest["model"]["roles"]["logits"]
        self.weights = {name: _aligned(w) for name, w in weights.items() if name in self.values}
        self.kv_entries = manifest["model"]["kv_cache"]["entries"]
        self.last_only = memory.logits_by_gemm(manifest)  # the last position's logits alone
        self.caches: dict[str, np.ndarray] = {}
        self.arena: dict[str, np.ndarray] = {}
        self.batch = None
        self.pages: BlockPool | None = None
        # values whose shape depends on the context length: re-viewed at every step (not the
        # caches: allocated at the longest context, passed whole)
        caches = {e[k] for e in self.kv_entries for k in ("past", "present")}
        self.growing = {name for name, info in self.values.items() if name not in caches
                        and any(names(a) & {"past", "total"} for d in info["shape"] if not isinstance(d, int)
                                for _, atoms in d for a in atoms)}
        # Every position's logits (a prefill's, when asked: `forward`) are written to an array
        # of their own, the caller's, made per step: the arena holds one position's, so that a
        # long context's logits (1024 x a 49k vocabulary: 192 MiB) cost no resident memory.
        self.logits_out: np.ndarray | None = None
        if self.last_only:
            self.growing.add(self.logits)
        self.timing: dict[str, float] | None = None  # when a dict: seconds per kernel, summed over runs
        self._makers: dict = {}

    def reset(self, batch: int) -> None:
        """Caches and arena for a new batch of sequences. The caches start empty: a step reads
        only the positions before its `past`, so buffers of the same batch size are kept
        (allocated and bound once, as a server would). A paged cache's pool (`pages`) keeps its
        blocks, all free again; it starts with a block per sequence and grows as they do."""
        if batch == self.batch:
            if self.pages:
                self.pages.clear()
            return
        offsets, sizes, size = memory.arena_plan(self.manifest, self.weights, batch, last_logits=self.last_only)
        page = self.manifest["model"]["kv_cache"]["layout"]["page_tokens"]
        self.pages = BlockPool(page, -(-self.max_seq // page), batch, self._grow) if page else None
        self._check_memory(memory.cache_bytes(self.manifest, batch, batch if page else None) + size,
                           f"a batch of {batch} at the artifact's context of {self.max_seq} tokens")
        self.batch = batch
        self._allocate_caches({"batch": batch, "past": self.max_seq, "blocks": batch})
        arena = aligned_empty((size,), np.uint8)
        self.arena = {name: arena[offset:offset + sizes[name]].view(self.values[name]["dtype"])
                      for name, offset in offsets.items()}
        self.no_tables = aligned_empty((batch * self.max_seq * 2,), np.float32)  # rope without rotary
        self._views = {name: {} for name in self.arena}
        self._bound = {}

    def _allocate_caches(self, env: dict, keep: dict | None = None) -> None:
        """The KV caches at `env`'s sizes; with `keep`, the old pools copied to their front. A
        paged pool starts zeroed: the kernels read (and mask out) slots no token was written to,
        and a zero weight times garbage could be NaN."""
        self.caches = {}
        for entry in self.kv_entries:
            info = self.values[entry["past"]]
            shape = [evaluate(d, env) for d in info["shape"]]
            cache = aligned_empty(shape, info["dtype"])
            if self.pages:
                cache[...] = 0
                if keep:
                    cache[:len(keep[entry["past"]])] = keep[entry["past"]]
            self.caches[entry["past"]] = self.caches[entry["present"]] = cache

    def _grow(self, blocks: int) -> None:
        """A paged cache's pool grows to `blocks` blocks (`paging.BlockPool`); calls bind anew."""
        env = {"batch": self.batch, "past": self.max_seq, "blocks": blocks}
        self._check_memory(memory.cache_bytes(self.manifest, self.batch, blocks),
                           f"a KV cache of {blocks} blocks of {self.pages.page_tokens} tokens")
        self._allocate_caches(env, keep=self.caches)
        self._bound = {}

    @staticmethod
    def _check_memory(need: int, what: str) -> None:
        free = memory.available()
        if free is not None and need > free:
            raise LlmcError(f"{what} needs {need / 2**30:.2f} GiB for its KV caches and activations; this "
                            f"machine has {free / 2**30:.2f} GiB free")

    def _view(self, name: str, env) -> np.ndarray:
        """The value's buffer, viewed at this step's shape (its front: aligned, contiguous).
        Views are kept per shape: from one decode step to the next most shapes repeat."""
        if name in self.weights:
            return self.weights[name]
        if name in self.caches:
            return self.caches[name]
        if name == self.logits and self.logits_out is not None:
            return self.logits_out
        shape = tuple(evaluate(d, env) for d in self.values[name]["shape"])
        views = self._views[name]
        view = views.get(shape)
        if view is None:
            view = views[shape] = self.arena[name][:math.prod(shape)].reshape(shape)
        return view

    def run(self, feeds: dict[str, np.ndarray], batch: int, seq: int, past: int,
            last_logits: bool = False) -> np.ndarray:
        """One forward step of `seq` new tokens in each of `batch` sequences over `feeds` (the
        token ids, and the mask and positions where the model takes them; no past: the caches
        hold it). Returns the logits, an array the caller owns. With `last_logits`, they are
        computed for the last position of each sequence only, [batch, 1, vocab]: all that
        generation reads after a prefill, and the largest GEMM of a small model's prefill."""
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        check_step(self.max_seq, self.batch, self.pages, batch, seq, past)
        last_logits = last_logits and seq > 1 and self.last_only
        every_position = self.last_only and seq > 1 and not last_logits
        self.logits_out = aligned_empty([evaluate(d, env) for d in self.values[self.logits]["shape"]], np.float32) \
            if every_position else None
        key = (batch, seq, last_logits)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = self.kernels.bind([self._bind(step, env, last_logits) for step in self.plan])
        for name, a in feeds.items():
            if name in self.values:  # a feed the compiled graph never reads has no buffer
                self._view(name, env)[...] = a
        seconds = None if self.timing is None else np.zeros(len(self.plan))
        try:
            bound.run(env, dict(env, seq=1), seconds)
        except KernelRefused as e:  # a kernel checks its arguments: the plan disagrees with it
            step = self.plan[e.index]
            raise LlmcError(f"plans.forward[{e.index}]: kernel {step['kernel']!r} refused the values "
                            f"{[a for a in step['args'] if a]}: {e.message}") from None
        if seconds is not None:
            for step, s in zip(self.plan, seconds):
                self.timing[step["kernel"]] = self.timing.get(step["kernel"], 0.0) + float(s)
        if every_position:
            return self.logits_out
        return self._view(self.logits, dict(env, seq=1) if last_logits else env).copy()

    def _bind(self, step, env, last_logits) -> Call:
        """One plan step's call. A maker lays a value out as the kernel takes it."""
        kind, names = step["kind"], step["args"]
        if last_logits and names[-1] == self.logits:
            return self._bind_last_logits(step, env)
        makers = [self._maker(kind, i, name) for i, name in enumerate(names)]
        args = [make(env) for make in makers]
        growing = {i: make for i, (name, make) in enumerate(zip(names, makers)) if name in self.growing}
        return Call(step["kernel"], args, growing, [], step["dims"], False)

    def _maker(self, kind, i, name):
        """How argument `i` of a `kind` kernel is made from value `name` at an env; one maker
        per layout of a value, so that a growing value shared by many calls is viewed once per
        run (`kernels.Calls`)."""
        form = "rows" if kind == "linear" and name not in self.weights else \
            "tables" if kind == "rope_cache" and i in (1, 2) else ""
        key = (form, name)
        if key not in self._makers:
            self._makers[key] = self._make_maker(form, name)
        return self._makers[key]

    def _make_maker(self, form, name):
        if not name:  # rope_cache without rotary: the kernel ignores its tables
            return lambda env: self.no_tables[:env["batch"] * env["seq"] * 2].reshape(env["batch"], env["seq"], 2)
        if form == "rows":
            # the kernel takes rows: x, residual and y as [rows, features] (views, same bytes); the
            # weights (packed [n/64, k, 64] and the like) pass as they are
            return lambda env: _rows(self._view(name, env))
        if form == "tables":  # rotary tables [b, 1, s, d] -> [b, s, d]: same bytes
            return lambda env: self._view(name, env).reshape(env["batch"], env["seq"], -1)
        return lambda env: self._view(name, env)

    def _bind_last_logits(self, step, env):
        """The logits GEMM over the last position only: its row inputs [b, s, k] become
        [b, k] (a view at batch 1, else copied into a kept buffer before the call), its output
        the logits viewed at seq 1; dims it takes are the last position's (seq 1)."""
        if step["kind"] != "linear":
            raise LlmcError(f"the logits come from a {step['kind']} kernel; only a GEMM computes them per position")
        args, copies = [], []
        for i, name in enumerate(step["args"][:-1]):
            if not name:  # a slot the kernel leaves unread
                args.append(self._maker(step["kind"], i, name)(env))
                continue
            a = self._view(name, env)
            if name not in self.weights and a.ndim == 3:
                rows = a[:, -1]
                if env["batch"] > 1:
                    buf = aligned_empty(rows.shape, rows.dtype)
                    copies.append((buf, rows))
                    rows = buf
                a = rows
            args.append(a)
        args.append(_rows(self._view(self.logits, dict(env, seq=1))))
        return Call(step["kernel"], args, {}, copies, step["dims"], True)


def _rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]) if a.ndim > 2 else a
