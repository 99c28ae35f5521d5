"""The text form of a graph, for people: one line per node, types on the right.

    graph main(%input_ids: i64[batch, seq]) {
      %w: f32[256, 64] = param
      %emb: f32[batch, seq, 64] = gather(%w, %input_ids) {axis=0}
      return %logits
    }
"""

from __future__ import annotations

import numpy as np


def _attr(v) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype}{list(v.shape)}" if v.size > 4 else f"{v.dtype}{v.tolist()}"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_attr(x) for x in v) + ")"
    return str(v)


def format_node(node) -> str:
    outs = ", ".join(f"%{v.name}" for v in node.outputs)
    args = ", ".join("_" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = {k: v for k, v in node.attrs.items() if v is not None}
    attr_text = (" {" + ", ".join(f"{k}={_attr(v)}" for k, v in attrs.items()) + "}") if attrs else ""
    types = ", ".join(str(v.type) for v in node.outputs)
    scope = f"  # {node.scope}" if node.scope else ""
    return f"{outs} = {node.op}({args}){attr_text}  : {types}{scope}"


def format_graph(graph, *, params: bool = True) -> str:
    ins = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph {graph.name}({ins}) {{"]
    if params:
        lines += [f"  %{v.name}: {v.type} = param" for v in graph.params.values()]
    lines += ["  " + format_node(n) for n in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
