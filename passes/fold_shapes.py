"""Fold the exporters' shape arithmetic (Shape/Gather/Unsqueeze/Concat/Range chains).

Every integer value whose contents shape inference already knows becomes a constant (all dims
static) or a `dims` node (dims in terms of the graph's input symbols, bound at run time). The
chains that computed them are then dead, and `reshape`/`expand`/`range` read their shape from a
`dims` node or a constant: a static view in the kernels' terms.
"""

from __future__ import annotations

import numpy as np

from llmc.ir.graph import Graph

from .manager import Pass, PassContext


def _fold(graph: Graph, ctx: PassContext) -> Graph:
    symbols = graph.symbols()
    for node in list(graph.nodes):
        if node.op == "dims" or len(node.outputs) != 1:
            continue
        v = node.outputs[0]
        if v.sym is None or v.dtype.value not in ("i64", "i32"):
            continue
        values = v.sym if isinstance(v.sym, tuple) else (v.sym,)
        if all(isinstance(d, int) for d in values):
            new = graph.add_param(f"{node.name}.folded", np.array(v.sym, v.dtype.numpy()))
            ctx.current.rewrites["to constant"] += 1
        elif all(isinstance(d, int) or d.atoms <= symbols for d in values):
            if v.dtype.value != "i64":
                continue
            (new,) = graph.add_node("dims", [], {"values": tuple(values)}, name=f"{node.name}.dims",
                                    scope=node.scope)
            if not isinstance(v.sym, tuple):  # a scalar: dims gives [n]; reshape to []
                (new,) = graph.add_node("squeeze", [new], {"axes": (0,)}, name=f"{node.name}.scalar",
                                        scope=node.scope)
            ctx.current.rewrites["to dims"] += 1
        else:
            continue
        graph.replace_uses(v, new)
    graph.remove_dead()
    graph.toposort()
    return graph


fold_shapes = Pass("fold_shapes", _fold)
