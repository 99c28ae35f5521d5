"""Compile a passed graph to one TVM library and a static plan of kernel calls.

Every node becomes a call of a kernel; equal kernels are built once (the layers of a model share
theirs). The plan names values, not tensors: the runtime binds them to its buffers. The KV cache
is the runtime's: `rope_cache` takes the merged QKV projection (the input of the split that
feeds it) and writes each layer's caches in place at the current length; attention reads them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, replace

from llmc.ir.graph import Graph, Node

from . import attention, injective, linear, rope_cache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One kernel call. `args` are value names (inputs, then outputs); `dims` the named dims
    passed as trailing scalars; `kind` tells the runtime how to lay the arguments out."""

    kernel: str
    kind: str  # "linear", "attention", "rope_cache", "injective"
    args: tuple[str, ...]
    dims: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


class UnsupportedGraph(ValueError):
    """A node no kernel runs; `node` is its name."""

    def __init__(self, message: str, node: str = ""):
        super().__init__(message)
        self.node = node


# a GEMM weight in the kernel's layout is named after the graph's with the packing's suffix
PACKINGS = {".packed16": "pack", ".nibbles16": "pack_nibbles"}


def _rope_qkv(node: Node):
    """The merged projection a rope_cache reads, its row width and where q starts in the row:
    q, k, v must be consecutive parts of one split along the last axis."""
    q, k, v = node.inputs[:3]
    split = q.producer
    parts = split.outputs if split is not None and split.op == "split" else []
    if [k.producer, v.producer] != [split, split] or q not in parts or \
            parts[parts.index(q):parts.index(q) + 3] != [q, k, v] or split.attrs["axis"] not in (-1, 2):
        raise UnsupportedGraph(f"{node.name}: q, k, v are not consecutive parts of one split of a projection",
                               node.name)
    offset = sum(p.shape[-1] for p in parts[:parts.index(q)])
    return split.inputs[0], offset


def _plan_node(node: Node, graph: Graph):
    """(kernel key, prim_func builder, step) for one node, or None for a node no kernel runs."""
    if node.op == "fused_linear":
        spec = linear.LinearSpec.of(node, graph)
        slots = dict(zip(["x", "w", "bias", "residual", "norm_scale", "norm_bias", "w_scale", "w_zero"], node.inputs))
        suffix = {fn: sfx for sfx, fn in PACKINGS.items()}
        args = [slots[a].name + (suffix[spec.packing(a).__name__] if spec.packing(a) else "")
                for a in spec.arg_names()[:-1]] + [node.outputs[0].name]
        return repr(spec), lambda: linear.schedule(spec).mod["main"], Step("", "linear", tuple(args))
    int8 = kv_int8(graph)
    if node.op == "attention":
        spec = replace(attention.AttentionSpec.of(node), kv_int8=int8)
        q, k, v, *mask = [v.name for v in node.inputs if v is not None]
        args = [q, k, v] + [k + SCALE, v + SCALE] * int8 + mask + [node.outputs[0].name]
        return repr(spec), lambda: attention.schedule(spec).mod["main"], Step(
            "", "attention", tuple(args), () if spec.masked else ("total",))
    if node.op == "rope_cache":
        qkv, offset = _rope_qkv(node)
        spec = replace(rope_cache.RopeCacheSpec.of(node), row_width=qkv.shape[-1], offset=offset, kv_int8=int8)
        cos, sin, past_k, past_v = node.inputs[3:7]
        # without a cache, the kernel writes k and v into the node's own outputs, from position 0
        caches = [past_k.name, past_v.name] if past_k is not None else [v.name for v in node.outputs[1:]]
        if past_k is None and int8:
            raise UnsupportedGraph(f"{node.name}: an int8 KV cache needs a graph with past_key_values", node.name)
        tables = [cos.name, sin.name] if cos is not None else ["", ""]
        scales = [c + SCALE for c in caches] * int8
        args = [qkv.name, *tables, *caches, *scales, node.outputs[0].name]
        return repr(spec), lambda: rope_cache.prim_func(spec), Step("", "rope_cache", tuple(args), ("past",))
    if node.op in injective.LOWERINGS:
        key = _node_key(node)
        args = [v.name for pos, v in enumerate(node.inputs)
                if v is not None and not (node.op in ("reshape", "expand") and pos == 1)]
        return key, lambda: injective.prim_func(node), Step(
            "", "injective", tuple(args + [v.name for v in node.outputs]), tuple(injective.dim_names(node)))
    raise UnsupportedGraph(f"{node.name}: no TVM kernel for op {node.op!r}", node.name)


SCALE = ".scale"  # an int8 cache's scales [batch, kv_heads, max_seq]: a cache of its own


def kv_int8(graph: Graph) -> bool:
    """Whether the KV cache is int8 (`graph.metadata["kv_cache"]["dtype"]`, set by the driver)."""
    return graph.metadata.get("kv_cache", {}).get("dtype") == "int8"


def lay_out_caches(graph: Graph, dtype: str) -> dict:
    """Record the KV cache's encoding ("f32" or "int8") in `graph.metadata["kv_cache"]`; returns
    the runtime's caches as plan values, {name: (dtype, shape)}. With int8 the keys and values
    are int8, and their scales [batch, kv_heads, max_seq] are caches too, with past/present
    pairs of their own."""
    cache = graph.metadata["kv_cache"]
    cache["dtype"] = dtype
    by_name = {v.name: v for v in graph.values()}
    out, scales = {}, []
    for e in cache["entries"]:
        past = by_name[e["past"]]
        if dtype == "int8":
            out[e["past"]] = ("int8", past.shape)
            out[e["past"] + SCALE] = (past.dtype.numpy().name, past.shape[:-1])
            scales.append({"past": e["past"] + SCALE, "present": e["present"] + SCALE})
        else:
            out[e["past"]] = (past.dtype.numpy().name, past.shape)
    cache["entries"] += scales
    return out


def _node_key(node: Node) -> str:
    """Nodes with the same op, attributes and types share a kernel; so do the known contents of
    small integer inputs, which kernels may compile in (a slice's starts)."""
    types = [f"{v.type}={v.sym}" if v is not None else "_" for v in node.inputs] + [str(v.type) for v in node.outputs]
    return f"{node.op}|{sorted((k, repr(v)) for k, v in node.attrs.items())}|{types}"


def weights(graph: Graph, plan: list[Step]) -> dict:
    """The weights the plan reads: graph parameters, and GEMM weights packed for the kernel."""
    import numpy as np

    out = {}
    for name in {a for step in plan for a in step.args if a}:
        packed = next((sfx for sfx in PACKINGS if name.endswith(sfx)), None)
        if packed:
            out[name] = getattr(linear, PACKINGS[packed])(graph.store[name[:-len(packed)]])
        elif name in graph.params:
            out[name] = np.require(graph.store[name], requirements="C")
    return out


def compile_graph(graph: Graph, target: dict):
    """Returns (built TVM executable, kernel table, plan)."""
    import tvm

    funcs, plan = plan_graph(graph)
    executable = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(target))
    return executable, sorted(funcs), plan


def plan_graph(graph: Graph):
    """(kernels by name, plan), nothing built yet; UnsupportedGraph names a node no kernel runs."""
    readers = graph.consumers()
    funcs, plan, table = {}, [], {}
    for node in graph.nodes:
        if node.op == "split" and all(r.op == "rope_cache" for v in node.outputs for r in readers[v]) \
                and all(readers[v] for v in node.outputs):
            continue  # rope_cache reads the projection whole
        key, make, step = _plan_node(node, graph)
        name = table.get(key)
        if name is None:
            name = f"k{len(table)}_{node.op}_{hashlib.sha1(key.encode()).hexdigest()[:6]}"
            table[key] = name
            try:
                funcs[name] = make().with_attr("global_symbol", name)
            except NotImplementedError as e:
                raise UnsupportedGraph(str(e), node.name) from None
        plan.append(Step(name, step.kind, step.args, step.dims))
    log.info("%d nodes -> %d kernel calls, %d distinct kernels", len(graph.nodes), len(plan), len(funcs))
    return funcs, plan
