"""Run a compiled plan: kernel calls over value buffers, with the KV caches owned here.

The plan (from the artifact) lists kernel calls by value name; `values` gives each value's dtype
and shape, whose dims are integers or polynomials over the named dims (batch, seq, past,
total), encoded as [[coefficient, [dim, ...]], ...]. `reset` allocates the arena: one buffer per
value, at its largest shape; a step binds the named dims, takes each value as a view of the
front of its buffer, and calls the kernels, so it allocates no tensor memory. Each layer's keys
and values live in one buffer [batch, kv_heads, max_seq, head_dim] that `rope_cache` writes in
place and attention reads.

TVM kernels read 64-byte aligned memory; every buffer here is allocated so.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import LlmcError

ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def evaluate(dim, env: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    total = 0
    for coeff, atoms in dim:
        term = coeff
        for a in atoms:
            term *= env[a]
        total += term
    return total


class Executor:
    def __init__(self, functions: dict, plan: list[dict], values: dict, weights: dict[str, np.ndarray],
                 kv_entries: list[dict], max_seq: int, logits: str):
        self.functions, self.plan, self.values, self.max_seq = functions, plan, values, max_seq
        self.logits = logits
        self.weights = {name: aligned_copy(w) for name, w in weights.items()}
        self.kv_entries = kv_entries
        self.caches: dict[str, np.ndarray] = {}
        self.arena: dict[str, np.ndarray] = {}
        self.batch = None
        # kinds whose kernels take their arguments in another layout than the plan's values
        self._calls = {"linear": self._call_linear, "rope_cache": self._call_rope_cache}

    def reset(self, batch: int) -> None:
        """Caches and arena for a new batch of sequences (the caches start empty)."""
        self.batch = batch
        self.caches = {}
        for entry in self.kv_entries:
            info = self.values[entry["past"]]
            shape = [evaluate(d, {"batch": batch, "past": self.max_seq}) for d in info["shape"]]
            self.caches[entry["past"]] = aligned_empty(shape, info["dtype"])
            self.caches[entry["present"]] = self.caches[entry["past"]]
        largest = {"batch": batch, "seq": self.max_seq, "past": self.max_seq, "total": self.max_seq}
        self.arena = {name: aligned_empty((self._numel(info, largest),), info["dtype"])
                      for name, info in self.values.items() if name not in self.weights and name not in self.caches}
        self.no_tables = aligned_empty((batch * self.max_seq * 2,), np.float32)  # rope without rotary
        self.last_rows = {}  # per row input of the logits GEMM: its last position of each sequence
        self._views = {name: {} for name in self.arena}

    @staticmethod
    def _numel(info, env) -> int:
        return math.prod(evaluate(d, env) for d in info["shape"])

    def _view(self, name: str, env) -> np.ndarray:
        """The value's buffer, viewed at this step's shape (its front: aligned, contiguous).
        Views are kept per shape: from one decode step to the next most shapes repeat."""
        shape = tuple(evaluate(d, env) for d in self.values[name]["shape"])
        views = self._views[name]
        view = views.get(shape)
        if view is None:
            view = views[shape] = self.arena[name][:math.prod(shape)].reshape(shape)
        return view

    def run(self, feeds: dict[str, np.ndarray], past: int, last_logits: bool = False) -> dict[str, np.ndarray]:
        """One forward step over `feeds` (input_ids, attention_mask, position_ids; no past:
        the caches hold it). Returns every value of the step by name, the outputs among them
        (views into the arena: valid until the next step). With `last_logits`, the logits are
        computed for the last position of each sequence only, [batch, 1, vocab]: all that
        generation reads after a prefill, and the largest GEMM of a small model's prefill."""
        batch, seq = feeds["input_ids"].shape
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        if past + seq > self.max_seq:
            raise LlmcError(f"context of {past + seq} tokens exceeds the {self.max_seq} this artifact "
                            "was compiled for")
        if self.batch != batch:
            raise LlmcError(f"the caches hold a batch of {self.batch}, this step has {batch}")
        live = dict(self.weights)
        live.update(self.caches)
        for name, a in feeds.items():
            if name in self.values:  # a feed the compiled graph never reads has no buffer
                live[name] = self._view(name, env)
                live[name][...] = a
        for step in self.plan:
            fn = self.functions[step["kernel"]]
            if last_logits and seq > 1 and step["args"][-1] == self.logits:
                args = self._last_position_args(live, step, env)
            else:
                args = [None if not a else live[a] if a in live else self._take(live, a, env) for a in step["args"]]
            self._calls.get(step["kind"], self._call_plain)(fn, args, step, env)
        return live

    def _last_position_args(self, live, step, env):
        """The logits GEMM's arguments over the last position only: its row inputs [b, s, k]
        become [b, 1, k] (a view at batch 1, else a copy into a kept buffer), its output a view
        at seq 1."""
        if step["kind"] != "linear":
            raise LlmcError(f"the logits come from a {step['kind']} kernel; only a GEMM computes them per position")
        args = []
        for i, name in enumerate(step["args"][:-1]):
            a = live[name] if name in live else self._take(live, name, env)
            if i != 1 and a is not None and a.ndim == 3:
                rows = a[:, -1:]
                if rows.shape[0] > 1:
                    buf = self.last_rows.get(name)
                    if buf is None or buf.shape != rows.shape:
                        buf = self.last_rows[name] = aligned_empty(rows.shape, rows.dtype)
                    buf[...] = rows
                    rows = buf
                a = rows
            args.append(a)
        live[self.logits] = self._view(self.logits, dict(env, seq=1))
        return args + [live[self.logits]]

    def _take(self, live, name, env):
        live[name] = self._view(name, env)
        return live[name]

    def _call_plain(self, fn, args, step, env):
        """Arguments as the plan lists them, then the named dims the kernel takes."""
        fn(*args, *[env[d] for d in step["dims"]])

    def _call_linear(self, fn, args, step, env):
        # the kernel takes rows: x, residual and y as [rows, features] (views, same bytes); the
        # weight (argument 1) is packed [n/16, k, 16] and passes as it is
        fn(*[a.reshape(-1, a.shape[-1]) if i != 1 and a.ndim > 2 else a for i, a in enumerate(args)])

    def _call_rope_cache(self, fn, args, step, env):
        qkv, cos, sin, k_cache, v_cache, q = args
        b, s = qkv.shape[:2]
        if cos is None:  # no rotary (GPT-2, OPT): the kernel ignores its tables
            cos = sin = self.no_tables[:b * s * 2]
        cos, sin = (t.reshape(b, s, -1) for t in (cos, sin))  # [b, 1, s, d] -> [b, s, d]: same bytes
        fn(qkv, cos, sin, k_cache, v_cache, q, env["past"])
