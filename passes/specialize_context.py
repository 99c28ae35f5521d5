"""Specialize the graph for the longest context it will run (`max_seq_len` in the options).

Under past + seq <= max_seq_len, expressions exporters write for the general case simplify:
Mistral's sliding window of 4096 positions gives `min(past, 4095)` and `past[-4095:]`, which are
`past` and `past` when the context is shorter than the window (and Gemma's `min(past + seq,
1023)` is `past + seq` for a context of 1024). Types are re-inferred under that
assumption, and slices that became identities go. The bound is recorded in
`graph.metadata["max_seq_len"]`: a runtime must refuse longer contexts.
"""

from __future__ import annotations

from llmc.ir.graph import Graph
from llmc.ir.symbolic import assume_upper_bounds

from .manager import Pass, PassContext

CONTEXT_DIMS = ("past", "seq", "total")


def bounds(graph: Graph) -> dict:
    limit = graph.metadata.get("max_seq_len")
    return {**{d: limit for d in CONTEXT_DIMS}, ("past", "seq"): limit} if limit else {}


def _identity_slice(graph: Graph, node) -> bool:
    steps = node.inputs[4].sym if len(node.inputs) > 4 and node.inputs[4] is not None else None
    return node.outputs[0].shape == node.inputs[0].shape and steps is not None and \
        all(s == 1 for s in (steps if isinstance(steps, tuple) else (steps,)))


def _run(graph: Graph, ctx: PassContext) -> Graph:
    limit = ctx.options.max_seq_len
    if not limit:
        return graph
    graph.metadata["max_seq_len"] = int(limit)
    with assume_upper_bounds(bounds(graph)):
        graph.refresh_types()
        for node in list(graph.nodes):
            if node.op == "slice" and _identity_slice(graph, node):
                graph.replace_uses(node.outputs[0], node.inputs[0])
                ctx.current.rewrites["identity slice"] += 1
        graph.remove_dead()
        graph.refresh_types()
    return graph


specialize_context = Pass("specialize_context", _run)
