"""The verifier: structural checks a graph must pass after every pass (in debug mode).

It checks that every op is registered with matching inputs and attributes, that every value is
defined before use (so the node list is a topological order and the graph is a DAG), that value
names are unique, that node output types agree with what the op infers from its inputs now, that
params have data in the store, and that outputs are defined.
"""

from __future__ import annotations

from .graph import Graph


class VerificationError(Exception):
    pass


def verify(graph: Graph) -> None:
    from ..ops import get_op  # the op set imports the IR: import it when first needed

    problems: list[str] = []
    defined = set(graph.inputs) | set(graph.params.values())
    names: dict[str, object] = {}

    for v in defined:
        _unique_name(v, names, problems)
    for name, v in graph.params.items():
        if name != v.name or name not in graph.store:
            problems.append(f"param {name!r} has no data in the weight store")

    for node in graph.nodes:
        where = f"node {node.name!r} ({node.op})"
        try:
            opdef = get_op(node.op)
            opdef.check_inputs(node.inputs)
            if opdef.bind_attrs(node.attrs) != node.attrs:
                problems.append(f"{where}: attributes {node.attrs} lack defaults")
        except (KeyError, TypeError) as e:
            problems.append(f"{where}: {e}")
            continue
        for v in node.inputs:
            if v is not None and v not in defined:
                problems.append(f"{where}: input {v.name!r} is used before it is defined "
                                "(not a topological order, a cycle, or a dangling value)")
        try:
            types = opdef.infer(node.inputs, **node.attrs)
        except Exception as e:  # noqa: BLE001 (any inference failure is a finding)
            problems.append(f"{where}: type inference fails: {e}")
            types = None
        if types is not None and len(types) != len(node.outputs):
            problems.append(f"{where}: has {len(node.outputs)} outputs, the op infers {len(types)}")
        for i, v in enumerate(node.outputs):
            _unique_name(v, names, problems)
            if v.producer is not node:
                problems.append(f"{where}: output {v.name!r} does not point back to its node")
            if types is not None and i < len(types) and not _agrees(types[i], v.type):
                problems.append(f"{where}: output {v.name!r} is typed {v.type}, "
                                f"the op infers {types[i]}")
            defined.add(v)

    for v in graph.outputs:
        if v not in defined:
            problems.append(f"graph output {v.name!r} is not defined")
    if problems:
        raise VerificationError(f"graph {graph.name!r} fails verification:\n  " +
                                "\n  ".join(problems[:20]) +
                                (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))


def _unique_name(v, names, problems):
    if names.setdefault(v.name, v) is not v:
        problems.append(f"value name {v.name!r} is used twice")


def _agrees(inferred, actual) -> bool:
    """Inference may leave a dim unknown (None); the node then holds a fresh symbol for it."""
    return (inferred.dtype == actual.dtype and len(inferred.shape) == len(actual.shape)
            and all(i is None or i == a for i, a in zip(inferred.shape, actual.shape)))
