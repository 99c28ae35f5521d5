"""Which nodes of a passed graph become kernels, as `llmc inspect --passes` and the tests count
them. Views (reshapes, splits along the last axis, squeezes, folded shape values) cost no
kernel: a backend reads them as strides into their input. Everything else is one kernel."""

from __future__ import annotations

VIEW_OPS = frozenset({"reshape", "squeeze", "unsqueeze", "flatten", "split", "dims", "identity"})


def kernel_nodes(nodes) -> list:
    return [n for n in nodes if n.op not in VIEW_OPS]


def kernels_per_layer(graph, layer: int = 1) -> list:
    """The kernels of one transformer layer (layer 1: layer 0 may hold work hoisted out of the
    loop, such as the shared mask)."""
    from .draw import layer_nodes

    return kernel_nodes(layer_nodes(graph, layer))
