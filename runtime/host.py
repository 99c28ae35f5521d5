"""The CPU executor: a plan's kernels called in this process on host memory, with libllmc's
kernel library (a CPU artifact's, `kernels.KernelLibrary`) or with Python callables (a cuda
artifact's Triton kernels under Triton's interpreter, `Functions`).

Host memory is numpy: every buffer 64-byte aligned (TVM kernels read aligned memory), the
weights used in place (views on the artifact's weights file read into memory, aligned by the
writer). Each value is viewed at a step's shape from the front of its place in the arena, and an
argument at the shape its step's `views` gives (the same bytes), so a step allocates no tensor
memory. The kernel calls are bound once per (batch, seq): argument arrays are prepared then, and
a decode step only re-views the few values whose shape grows with the context (the mask) and
passes the current lengths.
"""

from __future__ import annotations

import math
import time
from typing import Callable, NamedTuple

import numpy as np

from . import memory
from .dims import atom, evaluate, names
from .errors import LlmcError
from .executor import Executor
from .kernels import KernelRefused
from .memory import ALIGN


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


class HostMemory:
    """The executor core's device (`executor.Device`) for host memory: buffers are aligned
    numpy byte arrays."""

    align = ALIGN

    def alloc(self, nbytes: int, zero: bool = False) -> np.ndarray:
        buffer = aligned_empty((max(nbytes, 4),), np.uint8)
        if zero:
            buffer[...] = 0
        return buffer

    def upload(self, array: np.ndarray) -> np.ndarray:
        """`array` itself when the kernels can read it in place, else an aligned copy."""
        if array.ctypes.data % ALIGN == 0 and array.flags.c_contiguous and array.flags.writeable:
            return array
        out = aligned_empty(array.shape, array.dtype)
        out[...] = array
        return out

    def view(self, buffer: np.ndarray, offset: int, nbytes: int) -> np.ndarray:
        return buffer[offset:offset + nbytes]

    def copy(self, source: np.ndarray, target: np.ndarray, nbytes: int) -> None:
        target[:nbytes] = source[:nbytes]

    def available(self) -> int | None:
        return memory.available()


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


class CpuExecutor(Executor):
    def __init__(self, kernels, manifest: dict, weights: dict[str, np.ndarray]):
        """`kernels`: kernels.KernelLibrary (a CPU artifact's) or Functions (Python callables)."""
        last_only = memory.logits_by_gemm(manifest)  # a GEMM computes the logits: the last position's alone
        super().__init__(HostMemory(), manifest, weights, last_only)
        self.kernels = kernels
        # values whose shape depends on the context length: re-viewed at every step (not the
        # caches: allocated at the longest context, passed whole)
        caches = {e[k] for e in self.kv_entries for k in ("past", "present")}
        self.past_of = {e["present"]: e["past"] for e in self.kv_entries}  # a present is its past's buffer
        self.growing = {name for name, info in self.values.items() if name not in caches
                        and any(names(a) & {"past", "total"} for d in info["shape"] if not isinstance(d, int)
                                for _, atoms in d for a in atoms)}
        self.cache_names = caches
        # Every position's logits (a prefill's, when asked) are written to an array of their
        # own, the caller's, made per step: the arena holds one position's, so that a long
        # context's logits (1024 x a 49k vocabulary: 192 MiB) cost no resident memory.
        self.logits_out: np.ndarray | None = None
        if self.last_only:
            self.growing.add(self.logits)
        self.timing: dict[str, float] | None = None  # when a dict: seconds per kernel, summed over runs
        self._bound: dict = {}
        self._makers: dict = {}
        self._views: dict = {}

    def _unbind(self) -> None:
        self._bound, self._makers, self._views = {}, {}, {}

    def _array(self, name: str, env: dict, view=None) -> np.ndarray:
        """The value's bytes at this step's shape (its front: aligned, contiguous), or at `view`'s
        (a step's view of them). Arrays are kept per shape: from one decode step to the next most
        shapes repeat."""
        if name == self.logits and self.logits_out is not None:
            a = self.logits_out
        elif name in self.weight_names:
            a = self.buffers[name]
        else:
            at = self.cache_env if name in self.cache_names else env
            info = self.values[self.past_of.get(name, name)]
            shape = tuple(evaluate(d, at) for d in info["shape"])
            a = self._views.get((name, shape))
            if a is None:
                a = self._views[name, shape] = \
                    self.buffers[name].view(info["dtype"])[:math.prod(shape)].reshape(shape)
        if view is not None:
            a = a.reshape([evaluate(d, env) for d in view])
        return a

    def _step(self, feeds, env, last_logits: bool = False) -> np.ndarray:
        """The logits [batch, seq, vocab] in an array the caller owns; with `last_logits`, they are
        computed for the last position of each sequence only, [batch, 1, vocab]: all that
        generation reads after a prefill, and the largest GEMM of a small model's prefill."""
        batch, seq = env["batch"], env["seq"]
        last_logits = last_logits and seq > 1 and self.last_only
        every_position = self.last_only and seq > 1 and not last_logits
        self.logits_out = aligned_empty([evaluate(d, env) for d in self.values[self.logits]["shape"]], np.float32) \
            if every_position else None
        key = (batch, seq, last_logits)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = self.kernels.bind([self._bind(step, env, last_logits) for step in self.plan])
        self._feed(feeds, env)
        self._run(bound, env, dict(env, seq=1))
        if every_position:
            return self.logits_out
        return self._array(self.logits, dict(env, seq=1) if last_logits else env).copy()

    def _step_rows(self, feeds, env, rows) -> np.ndarray:
        """The logits of `rows` only, [len(rows), vocab], of a step of one token per sequence
        (a server's ragged step: of a prompt chunk's rows only the last may want logits). Every
        step but the logits GEMM is bound per batch; the GEMM per number of rows, over its input
        rows gathered into buffers of its own between the two runs."""
        *body, head = self.plan
        if not self.last_only or head["args"][-1] != self.logits:  # the logits come some other way
            return super()._step_rows(feeds, env, rows)
        self.logits_out = None
        batch, n = env["batch"], len(rows)
        bound = self._bound.get((batch, "body"))
        if bound is None:
            bound = self._bound[batch, "body"] = self.kernels.bind([self._bind(s, env, False) for s in body])
        self._feed(feeds, env)
        self._run(bound, env, env, end=len(body))
        if not n:  # no row wants logits (a prompt's chunk that does not end it)
            return np.empty((0, evaluate(self.values[self.logits]["shape"][-1], env)), np.float32)
        head_env = dict(env, batch=n)
        if ("head", n) not in self._bound:
            args, inputs = self._head_args(head, env, head_env)
            self._bound["head", n] = self.kernels.bind([Call(head["kernel"], args, {}, [], head["dims"], True)]), inputs
        head_call, inputs = self._bound["head", n]
        for buffer, make in inputs:
            np.take(make(env).reshape(batch, -1), rows, axis=0, out=buffer)
        self._run(head_call, head_env, head_env, first=len(body))
        return self._array(self.logits, head_env).reshape(n, -1).copy()

    def _feed(self, feeds, env) -> None:
        for name, a in feeds.items():
            if name in self.values:  # a feed the compiled graph never reads has no buffer
                self._array(name, env)[...] = a

    def _run(self, bound, env, last_env, first: int = 0, end: int | None = None) -> None:
        """Run bound calls, plan steps `first` to `end`; a kernel refusing its arguments is named."""
        steps = self.plan[first:end]
        seconds = None if self.timing is None else np.zeros(len(steps))
        try:
            bound.run(env, last_env, seconds)
        except KernelRefused as e:  # a kernel checks its arguments: the plan disagrees with it
            step = self.plan[first + e.index]
            raise LlmcError(f"plans.forward[{first + e.index}]: kernel {step['kernel']!r} refused the values "
                            f"{[a for a in step['args'] if a]}: {e.message}") from None
        if seconds is not None:
            for step, s in zip(steps, seconds):
                self.timing[step["kernel"]] = self.timing.get(step["kernel"], 0.0) + float(s)

    def _bind(self, step, env, last_logits) -> Call:
        """One plan step's call: each argument viewed as the step says."""
        if last_logits and step["args"][-1] == self.logits:
            return self._bind_last_logits(step, env)
        makers = [self._maker(name, view) for name, view in zip(step["args"], step["views"])]
        args = [make(env) for make in makers]
        growing = {i: make for i, (name, make) in enumerate(zip(step["args"], makers)) if name in self.growing}
        return Call(step["kernel"], args, growing, [], step["dims"], False)

    def _maker(self, name: str, view):
        """How an argument is made from value `name` at an env; one maker per view of a value,
        so that a growing value shared by many calls is viewed once per run (`kernels.Calls`)."""
        key = (name, repr(view))
        if key not in self._makers:
            unread = self.dummy.view(np.float32)  # a pointer (Triton's) to any f32 memory
            self._makers[key] = (lambda env: unread) if not name else lambda env: self._array(name, env, view)
        return self._makers[key]

    def _bind_last_logits(self, step, env):
        """The logits GEMM over the last position only (a GEMM's rows are computed each alone):
        its activations [b, s, k] become [b, k], copied into buffers of their own before the
        call, its output the logits viewed at seq 1; dims it takes are the last position's."""
        args, inputs = self._head_args(step, env, dict(env, seq=1))
        copies = [(buffer, make(env).reshape(env["batch"], env["seq"], -1)[:, -1]) for buffer, make in inputs]
        return Call(step["kernel"], args, {}, copies, step["dims"], True)

    def _head_args(self, step, env, head_env) -> tuple[list, list]:
        """The logits GEMM's arguments for some rows of its input (head_env's batch x seq): each
        activation a buffer of those rows, the output the logits viewed at head_env. Returns the
        arguments and (buffer, the activation's maker) pairs, for the caller to fill the buffers."""
        if step["kind"] != "linear":
            raise LlmcError(f"the logits come from a {step['kind']} kernel; only a GEMM computes them per position")
        args, inputs = [], []
        for name, view in zip(step["args"][:-1], step["views"]):
            make = self._maker(name, view)
            a = make(env)
            if name and name not in self.weight_names:  # an activation [b, s, k] (or its rows)
                buffer = aligned_empty((head_env["batch"] * head_env["seq"], a.size // (env["batch"] * env["seq"])),
                                       a.dtype)
                inputs.append((buffer, make))
                a = buffer
            args.append(a)
        args.append(self._array(self.logits, head_env, step["views"][-1]))
        return args, inputs
