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
copies no cache. Symbolic dims are bound from the inputs' sizes at every call.
"""

from __future__ import annotations

from llmc.backends.tvm.compile import Step, weights
from llmc.errors import LlmcError
from llmc.ir.graph import Graph
from llmc.ir.symbolic import Sym, evaluate

ALIGN = 64


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
        self.weights = {name: torch.from_numpy(w) for name, w in weights(graph, plan).items()}
        self.weights = {name: w if w.data_ptr() % ALIGN == 0 else w.clone() for name, w in self.weights.items()}
        self.weights.update({name: torch.from_numpy(graph.store[name].copy()) for name in graph.params
                             if name in self.outputs and name not in self.weights})
        # a cache rope_cache writes: the past it reads -> the present (its k or v output) it makes
        self.present_of = {past.name: present.name for n in graph.nodes if n.op == "rope_cache"
                           for past, present in zip(n.inputs[5:7], n.outputs[1:]) if past is not None}
        # a static cache: the positions it is written at (rope_cache's last input)
        self.positions_of = {past.name: n.inputs[7].name for n in graph.nodes if n.op == "rope_cache"
                             and len(n.inputs) > 7 and n.inputs[7] is not None for past in n.inputs[5:7]}
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
        bufs = dict(self.weights)
        for name, t in zip(self.inputs, tensors):
            if not t.is_contiguous() or t.data_ptr() % ALIGN:
                t = t.contiguous() if t.data_ptr() % ALIGN == 0 else t.clone(memory_format=torch.contiguous_format)
            bufs[name] = t

        def buf(name):
            b = bufs.get(name)
            if b is None:
                shape, dtype = self.layouts[name]
                b = bufs[name] = torch.empty(tuple(evaluate(d, env) for d in shape), dtype=dtype)
            return b

        for step in self.plan:
            if step.kind == "rope_cache":
                self._rope_cache(step, bufs, buf, env)
                continue
            call = [buf(a) for a in step.args]
            if step.kind == "linear":
                call = [a if a.dim() <= 2 or name in self.weights else a.view(-1, a.shape[-1])
                        for name, a in zip(step.args, call)]
            if step.kind == "attention":  # unmasked, it takes the keys' length: here the whole cache
                dims = [call[1].shape[2]] * len(step.dims)
            else:
                dims = [env[d] for d in step.dims]
            self.functions[step.kernel](*call, *dims)
        return tuple(buf(name) for name in self.outputs)

    def _rope_cache(self, step, bufs, buf, env):
        """The caches: the static cache itself, written at its positions; a new present holding
        the past (functional concat); or without a past the node's own k/v outputs. The "past"
        dim is where the new rows go."""
        qkv, cos, sin, k, v, *rest = step.args
        x = buf(qkv)
        batch, seq = x.shape[0], x.shape[1]
        caches, past_len = [], None
        if k in self.positions_of:
            past_len = _first_position(bufs[self.positions_of[k]], seq, bufs[k].shape[2], k)
        for name in (k, v):
            present = self.present_of.get(name)
            if name in self.positions_of:
                caches.append(bufs.setdefault(present, bufs[name]))
            elif present is not None:
                past = bufs[name]
                out = buf(present)
                # numpy copies on this thread: torch's parallel copy would wake its OpenMP pool
                # while TVM's workers still spin, and the two pools fight over the cores
                out.numpy()[:, :, :past.shape[2]] = past.numpy()
                caches.append(out)
            else:
                caches.append(buf(name))
        tables = [self._table(buf(t), batch, seq) if t else _no_tables(batch, seq) for t in (cos, sin)]
        if past_len is None:
            past_len = caches[0].shape[2] - seq
        self.functions[step.kernel](x, *tables, *caches, *[buf(a) for a in rest], past_len)


    @staticmethod
    def _table(t, batch, seq):
        """A rotary table [b, 1, s, d] as the kernel takes it, [batch, s, d]: the positions of
        one sequence serve all of a batch when torch computed them once."""
        t = t.reshape(t.shape[0], seq, -1)
        return t if t.shape[0] == batch else t.expand(batch, -1, -1).contiguous()


def _first_position(positions, seq: int, length: int, cache: str) -> int:
    """Where a static cache's new rows start: its positions must be consecutive (the kernel
    writes rows p..p+seq-1) and inside the cache."""
    import torch

    flat = positions.reshape(-1)
    start = int(flat[0]) if flat.numel() else 0
    consecutive = flat.numel() == seq and (seq == 1 or torch.equal(flat.cpu(), torch.arange(start, start + seq)))
    if not consecutive or start < 0 or start + seq > length:
        raise LlmcError(f"{cache}: a static cache is written at {seq} consecutive positions inside its {length}; "
                        f"got {positions.reshape(-1).tolist()[:8]}")
    return start


def _no_tables(batch, seq):
    import torch

    return torch.empty((batch, seq, 2), dtype=torch.float32)

