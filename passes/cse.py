"""Common-subexpression elimination: nodes with the same op, inputs and attributes compute the
same value once; small parameters with the same contents become one."""

from __future__ import annotations

import numpy as np

from llmc.ir.graph import Graph

from .manager import Pass, PassContext

_SMALL = 64  # parameters up to this many elements are compared by contents


def _key_attr(v):
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, list):
        return tuple(v)
    return v


def _cse(graph: Graph, ctx: PassContext) -> Graph:
    canon = {}
    for v in list(graph.params.values()):
        data = graph.const_value(v)
        if data.size <= _SMALL:
            key = (data.dtype.str, data.shape, data.tobytes())
            if key in canon:
                graph.replace_uses(v, canon[key])
                ctx.current.rewrites["param"] += 1
            else:
                canon[key] = v
    seen = {}
    for node in graph.nodes:
        key = (node.op, tuple(id(v) for v in node.inputs),
               tuple(sorted((k, _key_attr(a)) for k, a in node.attrs.items())))
        if key in seen:
            for old, new in zip(node.outputs, seen[key].outputs):
                graph.replace_uses(old, new)
            ctx.current.rewrites[node.op] += 1
        else:
            seen[key] = node
    graph.remove_dead()
    return graph


cse = Pass("cse", _cse)
