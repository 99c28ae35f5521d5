"""Run a compiled graph's kernel plan on torch tensors, in process (the `torch.compile` backend).

The artifact runtime (`llmc.runtime`) owns its KV cache and runs the decode loop itself. Here
the caller owns everything: a call takes the graph's inputs as torch tensors and returns its
outputs as new torch tensors, like the eager module it replaces. Tensors pass to the TVM kernels
through DLPack, without copies; torch's CPU allocator gives the 64-byte alignment the kernels
assume, and an input that is not contiguous and aligned is copied once.

A functional KV cache (`present = concat(past, new)`, which the KV cache pass turned into a
write by `rope_cache`) is a new tensor [batch, kv_heads, past + seq, head_dim] per call: the past
is copied into its front and the kernel writes the new rows after it, the same work as eager's
concat. A static cache (transformers' StaticCache: `index_copy` at the cache positions, which
the graph returns as the cache's new value) is written in place: the present is the caller's
tensor itself, so AOTAutograd's copy of it back into the input is a no-op, and a decode step
copies no cache.

Symbolic dims are bound from the inputs' sizes at every call. The kernel calls are bound once
per set of sizes, as the artifact runtime binds them: the intermediates get one arena planned by
lifetime (`llmc.runtime.memory`), the argument lists and dims are prepared, and a call only puts
its inputs and new outputs in their places. The bindings of the last `KEEP` sets of sizes are
kept: a static cache's decode steps all have one set; a dynamic cache's each have a new one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
import numpy as np

from llmc.backends.tvm.compile import Step, weights
from llmc.errors import LlmcError
from llmc.ir.graph import Graph
from llmc.ir.symbolic import Sym, evaluate
from llmc.runtime import memory

ALIGN = memory.ALIGN
KEEP = 2  # bound sets of sizes kept: a static cache's prefill and decode step


class TorchPlan:
    """`TorchPlan(graph, executable, plan)(*inputs) -> tuple of output tensors`; `inputs` in
    `graph.inputs` order, SymInt sizes included where `dim_inputs` names them."""

    def __init__(self, graph: Graph, executable, plan: list[Step], dim_inputs: list[str] | None = None):
        import torch

        self.plan = plan
        self.functions = {s.kernel: executable[s.kernel] for s in plan}
        # each value's (shape, dtype), looked up when a call allocates it
        self.layouts = {v.name: (v.shape, getattr(torch, v.dtype.numpy().name)) for v in graph.values()}
        self.inputs = [v.name for v in graph.inputs]
        self.outputs = [v.name for v in graph.outputs]
        self.weights = {name: torch.from_numpy(np.require(make(), requirements="C"))
                        for name, make in weights(graph, plan).items()}
        self.weights = {name: w if w.data_ptr() % ALIGN == 0 else w.clone() for name, w in self.weights.items()}
        self.weights.update({name: torch.from_numpy(graph.store[name].copy()) for name in graph.params
                             if name in self.outputs and name not in self.weights})
        # a cache rope_cache writes: the past it reads -> the present (its k or v output) it makes
        self.present_of = {past.name: present.name for n in graph.nodes if n.op == "rope_cache"
                           for past, present in zip(n.inputs[5:7], n.outputs[1:]) if past is not None}
        # a static cache: the positions it is written at (rope_cache's last input)
        self.positions_of = {past.name: n.inputs[7].name for n in graph.nodes if n.op == "rope_cache"
                             and len(n.inputs) > 7 and n.inputs[7] is not None for past in n.inputs[5:7]}
        # per call: the inputs, the static caches' presents (the inputs themselves), new outputs
        # (a cache StaticCache creates inside the graph is a constant: its present is a new tensor)
        self.aliases = {self.present_of[past]: past for past in self.positions_of if past in self.inputs}
        self.fresh = [n for n in self.outputs if n not in self.weights and n not in self.aliases
                      and n not in self.inputs]
        self.per_call = set(self.inputs) | set(self.aliases) | set(self.fresh)
        # each symbol is bound from an input's size: (input position, axis), or a SymInt input
        self.binders: dict[str, tuple[int, int | None]] = {}
        for i, v in enumerate(graph.inputs):
            for axis, d in enumerate(v.shape):
                if isinstance(d, Sym) and len(d.atoms) == 1 and d == Sym.var(next(iter(d.atoms))):
                    self.binders.setdefault(next(iter(d.atoms)), (i, axis))
        bounds = graph.index_bounds()
        self.bounds = [(i, v.name, bounds[v.name]) for i, v in enumerate(graph.inputs) if v.name in bounds]
        self.dim_inputs = dim_inputs or []
        unbound = graph.symbols() - set(self.binders) - set(self.dim_inputs)
        if unbound:
            raise LlmcError(f"dims {sorted(unbound)} are not the size of any input")
        # the intermediates and when each is alive, the same at every size (what a step touches:
        # its arguments; rope_cache's also the presents it writes and a static cache's positions)
        reads = [s.args + (self._cache_args(s) if s.kind == "rope_cache" else ()) for s in plan]
        self.intermediates = {a for args in reads for a in args if a} - self.per_call - set(self.weights)
        self.lives = memory.lifetimes([{"args": args} for args in reads], self.intermediates, (), ())
        self._bound: OrderedDict[tuple, tuple[dict, list]] = OrderedDict()
        # one arena serves every binding (calls never overlap); it grows by half at least, so that
        # a dynamic cache's steps, each a new size, do not each fault in new memory
        self._arena = torch.empty(0, dtype=torch.uint8)

    def __call__(self, *args):
        import torch

        tensors = args[:len(self.inputs)]
        for i, name, rows in self.bounds:  # the gather kernels do not check their indices
            ids = tensors[i]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise LlmcError(f"{name}: index {bad} is outside the table it indexes (0..{rows - 1})")
        env = {name: int(a) for name, a in zip(self.dim_inputs, args[len(self.inputs):])}
        for sym, (i, axis) in self.binders.items():
            env[sym] = tensors[i].shape[axis]
        key = tuple(sorted(env.items()))
        fixed, steps = bound = self._bound.pop(key, None) or self._bind(env)
        self._bound[key] = bound
        if len(self._bound) > KEEP:
            self._bound.popitem(last=False)

        vals = dict(fixed)
        for name, t in zip(self.inputs, tensors):
            if not t.is_contiguous() or t.data_ptr() % ALIGN:
                t = t.contiguous() if t.data_ptr() % ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)
            vals[name] = t
        for present, past in self.aliases.items():
            vals[present] = vals[past]
        for name in self.fresh:
            shape, dtype = self.layouts[name]
            vals[name] = torch.empty(tuple(evaluate(d, env) for d in shape), dtype=dtype)
        starts = {}
        for fn, call, patches, copies, dims, start in steps:
            for j, name, lay_out in patches:
                call[j] = lay_out(vals[name]) if lay_out else vals[name]
            for present, past in copies:
                # numpy copies on this thread: torch's parallel copy would wake its OpenMP pool
                # while TVM's workers still spin, and the two pools fight over the cores
                t = vals[past]
                vals[present].numpy()[:, :, :t.shape[2]] = t.numpy()
            if start is not None:
                positions, seq, length, cache = start
                if positions not in starts:
                    starts[positions] = _first_position(vals[positions], seq, length, cache)
                dims = (starts[positions],)
            fn(*call, *dims)
        return tuple(vals[name] for name in self.outputs)

    def _bind(self, env) -> tuple[dict, list]:
        """The plan at `env`'s sizes: the weights and the intermediates (views into one arena),
        and each call's (kernel, argument list, [(position, value, layout)] to fill at each call,
        [(present, past)] caches to copy before it, dims, a static cache's start or None)."""
        import torch

        def shape(name):
            return tuple(evaluate(d, env) for d in self.layouts[name][0])

        sizes = {n: math.prod(shape(n)) * self.layouts[n][1].itemsize for n in self.intermediates}
        offsets, size = memory.assign(sizes, self.lives)
        if self._arena.numel() < size:
            self._arena = torch.empty(max(size, self._arena.numel() * 3 // 2), dtype=torch.uint8)
        arena = self._arena
        fixed = dict(self.weights)
        fixed.update({n: arena[offsets[n]:offsets[n] + sizes[n]].view(self.layouts[n][1]).view(shape(n))
                      for n in self.intermediates})

        steps = []
        for step in self.plan:
            # each argument as the step's view shows it (the same bytes, or broadcast: `_viewed`)
            views = [None if v is None else tuple(evaluate(d, env) for d in v)
                     for v in step.views or [None] * len(step.args)]
            arg_names, copies, start = step.args, [], None
            # The caches are the caller's here, not a runtime's: attention and rope_cache see them
            # as they are (the past's length, a new present or the static cache itself)
            if step.kind == "attention":  # unmasked, it takes the keys' length: the whole cache
                dims = (shape(step.args[1])[2],) * len(step.dims)
            elif step.kind == "rope_cache":
                at = _caches_at(step)
                past_k, past_v = step.args[at:at + 2]
                k, v = self._cache_args(step)[:2]
                copies = [(self.present_of[c], c) for c in (past_k, past_v) if c in self.present_of
                          and self.present_of[c] not in self.aliases]
                arg_names = step.args[:at] + (k, v) + step.args[at + 2:]
                seq = shape(step.args[0])[1]
                if past_k in self.positions_of:
                    start, dims = (self.positions_of[past_k], seq, shape(past_k)[2], past_k), ()
                else:
                    dims = (shape(k)[2] - seq,)
            else:
                dims = tuple(env[d] for d in step.dims)
            call, patches = [], []
            for j, (name, view) in enumerate(zip(arg_names, views)):
                t = fixed.get(name)
                if t is not None and (view is None or t.numel() == math.prod(view)):  # the same tensor every call
                    call.append(t if view is None else t.view(view))
                else:
                    call.append(None)
                    patches.append((j, name, view and _viewed(view)))
            steps.append((self.functions[step.kernel], call, patches, copies, dims, start))
        return fixed, steps

    def _cache_args(self, step) -> tuple[str, ...]:
        """The caches a rope_cache step writes, the presents (a static one's is its input
        itself), and a static cache's positions."""
        at = _caches_at(step)
        k, v = step.args[at:at + 2]
        return (self.present_of.get(k, k), self.present_of.get(v, v)) + \
            ((self.positions_of[k],) if k in self.positions_of else ())


def _caches_at(step) -> int:
    """Where a rope_cache step's caches are among its arguments: (qkv, [cos, sin,] k, v, q), the
    tables only with rotation (a graph here has no int8 or paged cache)."""
    return len(step.args) - 3


def _viewed(shape: tuple[int, ...]):
    """A tensor as its step's view shows it: the same bytes, or, where torch computed it once for
    a batch of sequences (rotary tables of positions [1, seq]), broadcast to the view's batch."""
    def lay_out(t):
        if t.numel() == math.prod(shape):
            return t.view(shape)
        return t.reshape(1, *shape[1:]).expand(shape).contiguous()
    return lay_out


def _first_position(positions, seq: int, length: int, cache: str) -> int:
    """Where a static cache's new rows start: its positions must be consecutive (the kernel
    writes rows p..p+seq-1) and inside the cache."""
    import torch

    if seq == 1 and positions.numel() == 1:  # a decode step
        start, consecutive = int(positions.item()), True
    else:
        flat = positions.reshape(-1)
        start = int(flat[0]) if flat.numel() else 0
        consecutive = flat.numel() == seq and torch.equal(flat.cpu(), torch.arange(start, start + seq))
    if not consecutive or start < 0 or start + seq > length:
        raise LlmcError(f"{cache}: a static cache is written at {seq} consecutive positions inside its {length}; "
                        f"got {positions.reshape(-1).tolist()[:8]}")
    return start
