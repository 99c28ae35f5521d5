"""What every backend's plan is made of: steps (kernel calls over named values) and the walk that
turns a passed graph's nodes into steps, building each distinct kernel once (the layers of a
model share theirs). The KV cache's layout, and the arguments of the steps that read or write
it, are `cache_layout.py`'s.

The plan names values, not tensors: a runtime binds them to its buffers. The KV cache is the
runtime's: `rope_cache` takes the merged QKV projection (the input of the split that feeds it)
and writes each layer's caches in place at the current length; attention reads them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Callable

from llmc.ir.graph import Graph, Node
from llmc.ir.symbolic import Sym

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One kernel call. `args` are value names (inputs, then outputs, "" for a slot the kernel
    leaves unread); `dims` the named dims passed as trailing scalars; `views` the shape (IR dims)
    at which the kernel takes each argument's bytes where that differs from the value's own (a
    GEMM takes [batch, seq, k] as [rows, k]), else None; () for none. A runtime views its buffers
    as the plan says and knows no op kind."""

    kernel: str
    kind: str  # the op family, for reports: "linear", "attention", "rope_cache", "norm", "injective"
    args: tuple[str, ...]
    dims: tuple[str, ...] = ()
    views: tuple = ()

    def to_json(self) -> dict:
        views = [None if v is None else [encode_dim(d, f"a view of {a}") for d in v]
                 for a, v in zip(self.args, self.views or [None] * len(self.args))]
        return {"kernel": self.kernel, "kind": self.kind, "args": list(self.args), "dims": list(self.dims),
                "views": views}


class UnsupportedGraph(ValueError):
    """Nodes no kernel runs: `reasons` {node name: why}, `node` the first's name."""

    def __init__(self, message: str, node: str = "", reasons: dict[str, str] | None = None):
        super().__init__(message)
        self.reasons = reasons or ({node: message} if node else {})

    @property
    def node(self) -> str:
        return next(iter(self.reasons), "")


def encode_dim(d, where: str = "a dim"):
    """A dim as plans hold it: an int, or [[coefficient, [atom, ...]], ...] whose atoms are the
    run-time dims or expressions over them (`min(seq, 1)`), which the runtime evaluates
    (`llmc.runtime.dims`)."""
    from llmc.runtime.dims import is_atom

    if isinstance(d, int):
        return d
    if not all(is_atom(a) for a in d.atoms):
        raise UnsupportedGraph(f"{where}: dim {d} is not known at run time")
    return [[c, list(m)] for m, c in d.terms.items()]


def node_key(node: Node) -> str:
    """Nodes with the same op, attributes and types share a kernel; so do the known contents of
    small integer inputs, which kernels may compile in (a slice's starts)."""
    types = [f"{v.type}={v.sym}" if v is not None else "_" for v in node.inputs] + [str(v.type) for v in node.outputs]
    return f"{node.op}|{sorted((k, repr(v)) for k, v in node.attrs.items())}|{types}"


def feeds_rope_cache(node: Node, readers) -> bool:
    """A split whose every part goes to rope_cache: rope_cache reads the projection whole."""
    return node.op == "split" and all(readers[v] for v in node.outputs) and \
        all(r.op == "rope_cache" for v in node.outputs for r in readers[v])


# plan_node(node) -> (kernel key, kernel builder, steps); a builder makes the kernel named
# `name`, and the steps' kernel fields are "" or a suffix the name is prefixed to
PlanNode = Callable[[Node], "tuple[str, Callable[[str], object], list[Step]]"]


def plan_nodes(graph: Graph, plan_node: PlanNode):
    """(kernels by name, plan); UnsupportedGraph names every node no kernel runs (the first's
    reason in its message)."""
    readers = graph.consumers()
    kernels, plan, table, missing = {}, [], {}, []
    for node in graph.nodes:
        if feeds_rope_cache(node, readers):
            continue
        try:
            key, make, steps = plan_node(node)
            name = table.get(key)
            if name is None:
                name = f"k{len(table)}_{node.op}_{hashlib.sha1(key.encode()).hexdigest()[:6]}"
                try:
                    kernels.update(make(name))
                except NotImplementedError as e:
                    raise UnsupportedGraph(f"{node.name}: {e}", node.name) from None
                table[key] = name
        except UnsupportedGraph as e:
            missing.append(e)
            continue
        plan += [replace(s, kernel=name + s.kernel) for s in steps]
    if missing:
        more = f" (and {len(missing) - 1} more nodes)" if len(missing) > 1 else ""
        raise UnsupportedGraph(f"{missing[0]}{more}",
                               reasons={name: why for e in missing for name, why in e.reasons.items()})
    log.info("%d nodes -> %d kernel calls, %d distinct kernels", len(graph.nodes), len(plan), len(kernels))
    return kernels, plan
