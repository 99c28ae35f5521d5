"""The IR: a Graph of Nodes in topological order, connected by typed Values.

Values come from three places: graph inputs, parameters (weights and constants, whose data lives
in the graph's WeightStore), and node outputs. Nodes are created through `Graph.add_node`, which
checks the op against the registry, fills in attribute defaults, and infers the output types, so a
graph is typed at every step of its construction.

Integer tensors that describe shapes also carry `sym`: their contents as symbolic dims, when
known. That is how `Reshape(x, Concat(Shape(x)[0], 64))` gets the type `[batch, 64]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .dtypes import DType
from .symbolic import Dim, Sym, evaluate

# Integer parameters up to this many elements take part in symbolic shape arithmetic.
_SYM_MAX_ELEMENTS = 64


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: DType

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> Dim:
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return n

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def concrete(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(evaluate(d, env) for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


class Value:
    """An edge of the graph. `kind` is 'input', 'param' or 'node'."""

    __slots__ = ("name", "type", "kind", "producer", "sym")

    def __init__(self, name: str, type: TensorType, kind: str, producer: "Node | None" = None,
                 sym: tuple[Dim, ...] | Dim | None = None):
        self.name, self.type, self.kind, self.producer, self.sym = name, type, kind, producer, sym

    @property
    def shape(self) -> tuple[Dim, ...]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


class Node:
    """`scope` says where the node came from in the source model (the module path, such as
    `model.layers.0.self_attn`), when the frontend knows it."""

    __slots__ = ("op", "name", "inputs", "attrs", "outputs", "scope")

    def __init__(self, op: str, name: str, inputs: list[Value | None], attrs: dict[str, Any],
                 outputs: list[Value], scope: str = ""):
        self.op, self.name, self.inputs, self.attrs, self.outputs = op, name, inputs, attrs, outputs
        self.scope = scope

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name})"


class Graph:
    def __init__(self, name: str = "main", store=None):
        from ..weights import WeightStore

        self.name = name
        self.store = store if store is not None else WeightStore()
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.params: dict[str, Value] = {}
        self.metadata: dict[str, Any] = {}
        self._value_names: set[str] = set()
        self._node_names: set[str] = set()

    # Construction ----------------------------------------------------------------------------
    def unique_name(self, hint: str) -> str:
        """A value name not yet used in this graph, derived from `hint`."""
        return _unique(self._value_names, hint)

    def free_name(self, hint: str) -> str:
        """`hint`, or `hint_N`: a name no value of this graph has (not reserved: for an input
        or a rename to take)."""
        return _unique(set(self._value_names), hint)

    def rename(self, v: Value, name: str) -> None:
        """Give a node output a new name (the frontend uses the names of the source model)."""
        if v.kind != "node":
            raise ValueError(f"only node outputs can be renamed, not {v.kind} {v.name!r}")
        if name in self._value_names:
            raise ValueError(f"duplicate value name {name!r}")
        self._value_names.discard(v.name)
        self._value_names.add(name)
        v.name = name

    def add_input(self, name: str, type: TensorType) -> Value:
        if name in self._value_names:
            raise ValueError(f"duplicate value name {name!r}")
        self._value_names.add(name)
        v = Value(name, type, "input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, array=None) -> Value:
        """A weight or constant. With `array` (an array, or a function making it: `WeightStore.add`),
        the data is added to the store under `name`; without, `name` must already be in the store."""
        name = self.unique_name(name)
        if array is not None:
            # a new weight was likely made by reading others: their file pages need not stay resident
            self.store.release_pages()
            self.store.add(name, array)
        data = self.store[name]
        v = Value(name, TensorType(data.shape, DType.from_numpy(data.dtype)), "param")
        if data.dtype.kind in "iu" and data.size <= _SYM_MAX_ELEMENTS and data.ndim <= 1:
            v.sym = int(data) if data.ndim == 0 else tuple(int(x) for x in data)
        self.params[name] = v
        return v

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
                 name: str | None = None, output_names: Sequence[str] | None = None,
                 scope: str = "") -> list[Value]:
        from ..ops import get_op

        opdef = get_op(op)
        inputs = list(inputs)
        attrs = opdef.bind_attrs(attrs or {})
        opdef.check_inputs(inputs)
        node = Node(op, _unique(self._node_names, name or op), inputs, attrs, [], scope)
        types = opdef.infer(inputs, **attrs)
        syms = opdef.propagate_sym(inputs, len(types), **attrs)
        for i, (t, s) in enumerate(zip(types, syms)):
            if output_names:
                out_name = output_names[i]
                if out_name in self._value_names:
                    raise ValueError(f"duplicate value name {out_name!r}")
                self._value_names.add(out_name)
            else:
                out_name = self.unique_name(node.name if len(types) == 1 else f"{node.name}.{i}")
            # A dim that inference could not determine becomes a fresh symbol of its own.
            shape = tuple(Sym.var(f"{out_name}.d{j}") if d is None else d
                          for j, d in enumerate(t.shape))
            node.outputs.append(Value(out_name, t.with_shape(shape), "node", node, s))
        self.nodes.append(node)
        return node.outputs

    # Mutation (used by passes) ----------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every user of `old` use `new`. A graph output keeps its name: `new` takes it
        over when it is a fresh node output, else an identity node carries the name."""
        for node in self.nodes:
            node.inputs = [new if v is old else v for v in node.inputs]
        for i, v in enumerate(self.outputs):
            if v is old:
                self.outputs[i] = self._named_output(new, old.name)

    def _named_output(self, v: Value, name: str) -> Value:
        if v.name == name:
            return v
        self._value_names.discard(name)
        if v.kind == "node" and v not in self.outputs:
            self._value_names.discard(v.name)
            self._value_names.add(name)
            v.name = name
            return v
        return self.add_node("identity", [v], output_names=[name])[0]

    def refresh_types(self) -> None:
        """Infer every node's output types again, in order: after a rewrite changed what a node
        reads, or under new assumptions about the dims."""
        from ..ops import get_op

        for node in self.nodes:
            opdef = get_op(node.op)
            types = opdef.infer(node.inputs, **node.attrs)
            syms = opdef.propagate_sym(node.inputs, len(types), **node.attrs)
            for v, t, s in zip(node.outputs, types, syms):
                shape = tuple(old if new is None else new for new, old in zip(t.shape, v.shape)) \
                    if len(t.shape) == len(v.shape) else t.shape
                v.type, v.sym = t.with_shape(shape), s

    def toposort(self) -> None:
        """Restore a topological node order after rewrites appended nodes, keeping the existing
        relative order wherever the dependencies allow."""
        import heapq

        position = {n: i for i, n in enumerate(self.nodes)}
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        pending = {}
        for n in self.nodes:
            producers = {v.producer for v in n.inputs if v is not None and v.producer is not None}
            pending[n] = len(producers)
            for p in producers:
                users[p].append(n)
        ready = [(position[n], n.name, n) for n in self.nodes if pending[n] == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            _, _, n = heapq.heappop(ready)
            order.append(n)
            for u in users[n]:
                pending[u] -= 1
                if pending[u] == 0:
                    heapq.heappush(ready, (position[u], u.name, u))
        if len(order) != len(self.nodes):
            raise ValueError(f"graph {self.name!r} has a cycle")
        self.nodes = order

    def remove_dead(self) -> int:
        """Drop nodes no output depends on, and params nothing uses; returns the nodes dropped.
        Works in any node order (rewrites append nodes before the graph is re-sorted)."""
        live: set[Value] = set()
        live_nodes: set[Node] = set()
        work = list(self.outputs)
        while work:
            v = work.pop()
            if v in live:
                continue
            live.add(v)
            if v.producer is not None and v.producer not in live_nodes:
                live_nodes.add(v.producer)
                work.extend(i for i in v.producer.inputs if i is not None)
        dropped = len(self.nodes) - len(live_nodes)
        self.nodes = [n for n in self.nodes if n in live_nodes]
        for name in [name for name, v in self.params.items() if v not in live]:
            del self.params[name]
            self.store.discard(name)
        return dropped

    # Queries ---------------------------------------------------------------------------------
    def const_value(self, v: Value | None) -> np.ndarray | None:
        """The data of a parameter, or None for anything computed at run time."""
        if v is None or v.kind != "param":
            return None
        return self.store[v.name]

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.params.values()
        for n in self.nodes:
            yield from n.outputs

    def consumers(self) -> dict[Value, list[Node]]:
        users: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    users[v].append(n)
        return users

    def index_bounds(self) -> dict[str, int]:
        """Integer inputs that index a constant table (token ids into an embedding), with the
        table's rows: the ids a run must keep below. Kernels do not check bounds, so the runtimes
        check these inputs before they run."""
        bounds: dict[str, int] = {}
        users = self.consumers()
        for v in self.inputs:
            for n in users[v]:
                table = self.const_value(n.inputs[0])
                if n.op == "gather" and n.inputs[1] is v and n.attrs["axis"] == 0 and table is not None:
                    bounds[v.name] = min(bounds.get(v.name, table.shape[0]), table.shape[0])
        return bounds

    def symbols(self) -> set[str]:
        """The named dims of the graph's inputs (batch, seq, past, ...)."""
        return {a for v in self.inputs for d in v.shape if isinstance(d, Sym) for a in d.atoms}

    def param_bytes(self) -> int:
        return sum(int(self.store[n].nbytes) for n in self.params)

    def param_count(self) -> int:
        return sum(int(self.store[n].size) for n in self.params)

    def to_networkx(self):
        """A DiGraph with a node per IR node and an edge per value passed between nodes."""
        import networkx as nx

        g = nx.DiGraph()
        for n in self.nodes:
            g.add_node(n.name, op=n.op)
            for v in n.inputs:
                if v is not None and v.producer is not None:
                    g.add_edge(v.producer.name, n.name, value=v.name)
        return g

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)


def _unique(used: set[str], hint: str) -> str:
    name, i = hint or "v", 0
    while name in used:
        i += 1
        name = f"{hint}_{i}"
    used.add(name)
    return name
