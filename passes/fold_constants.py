"""Constant folding: a node whose inputs are all constants is evaluated once, at compile time,
with its reference implementation, and becomes a parameter. This also folds the transposes and
casts that exporters put on weights."""

from __future__ import annotations

import numpy as np

from llmc.ir.graph import Graph
from llmc.ops import get_op

from .manager import Pass, PassContext

# Outputs larger than their largest input (an expand of a scalar, say) are left to run time.
_GROWTH_LIMIT = 1


def _fold(graph: Graph, ctx: PassContext) -> Graph:
    for node in list(graph.nodes):
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or not all(v.kind == "param" for v in inputs) or node.op == "dims":
            continue
        args = [graph.const_value(v) for v in node.inputs]
        largest = max(a.size for a in args if a is not None)
        result = get_op(node.op).ref(*args, **node.attrs)
        results = result if isinstance(result, tuple) else (result,)
        if any(np.asarray(r).size > max(largest * _GROWTH_LIMIT, 64) for r in results):
            continue
        for v, r in zip(node.outputs, results):
            graph.replace_uses(v, graph.add_param(f"{v.name}.folded", np.asarray(r)))
        ctx.current.rewrites[node.op] += 1
    graph.remove_dead()
    return graph


fold_constants = Pass("fold_constants", _fold)
