"""Draw a graph (or one transformer layer of it) as SVG.

The layout is layered: networkx's topological generations give the rows, and each row is
ordered by the mean position of its predecessors to keep edges short. The SVG is written
directly, so drawing needs neither Graphviz nor matplotlib.
"""

from __future__ import annotations

import html
import re

import networkx as nx

from .graph import Graph

_MAX_NODES = 300
_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 150, 34, 20, 36
_LAYER = r"(?:^|[./_])(?:layers?|h|blocks?|decoder\.layers|encoder\.layer)[._]{k}(?:[./_]|$)"


def _layer_hits(graph: Graph, k: int) -> list[int]:
    """Nodes of layer k by their source scope; by the weights they use when no node has one."""
    pattern = re.compile(_LAYER.format(k=k))
    if any(n.scope for n in graph.nodes):
        return [i for i, n in enumerate(graph.nodes) if pattern.search(n.scope)]
    return [i for i, n in enumerate(graph.nodes)
            if any(v is not None and v.kind == "param" and pattern.search(v.name) for v in n.inputs)]


def layer_nodes(graph: Graph, k: int) -> list:
    """The nodes of transformer layer `k`, in topological order: from the first to the last
    node of that layer, after layer k-1 ends (work scoped to the layer but hoisted before the
    layers, such as Gemma 3's mask of its global layers, is not the layer's) and before layer
    k+1 starts (exporters share identical weights, such as all-ones norm scales, across layers)."""
    hits, following = _layer_hits(graph, k), _layer_hits(graph, k + 1)
    preceding = _layer_hits(graph, k - 1) if k else []
    if following:
        hits = [i for i in hits if i < following[0]]
    if preceding:
        hits = [i for i in hits if i > preceding[-1]]
    return graph.nodes[hits[0]:hits[-1] + 1] if hits else []


def select_nodes(graph: Graph, layer: int | None = None) -> tuple[list, str]:
    """What to draw: the whole graph when small, else one layer (layer 0 unless told)."""
    if layer is None and len(graph.nodes) <= _MAX_NODES:
        return graph.nodes, f"{graph.name} ({len(graph.nodes)} nodes)"
    k = 0 if layer is None else layer
    nodes = layer_nodes(graph, k)
    if not nodes:
        return graph.nodes[:_MAX_NODES], f"{graph.name}: first {_MAX_NODES} nodes (no layer {k} found)"
    return nodes, f"{graph.name}: layer {k} ({len(nodes)} nodes)"


def _render(nodes, title: str) -> tuple[list[str], int, int]:
    """SVG elements for `nodes` laid out in layers, and the width and height they take."""
    chosen = set(nodes)
    dag = nx.DiGraph()
    for n in nodes:
        dag.add_node(n)
        for v in n.inputs:
            if v is not None and v.producer in chosen:
                dag.add_edge(v.producer, n)
    rows, pos = [], {}
    for gen in nx.topological_generations(dag):
        gen.sort(key=lambda n: (sum(pos[p][0] for p in dag.predecessors(n)) /
                                max(1, dag.in_degree(n))) if dag.in_degree(n) else 0)
        for x, n in enumerate(gen):
            pos[n] = (x, len(rows))
        rows.append(gen)
    width = max((len(r) for r in rows), default=1) * (_BOX_W + _GAP_X) + _GAP_X
    height = len(rows) * (_BOX_H + _GAP_Y) + 60
    xy = {n: (_GAP_X + x * (_BOX_W + _GAP_X), 50 + y * (_BOX_H + _GAP_Y)) for n, (x, y) in pos.items()}
    out = [f'<text x="{_GAP_X}" y="24" font-size="14">{html.escape(title)}</text>']
    for a, b in dag.edges:
        (x1, y1), (x2, y2) = xy[a], xy[b]
        out.append(f'<line x1="{x1 + _BOX_W / 2}" y1="{y1 + _BOX_H}" x2="{x2 + _BOX_W / 2}" '
                   f'y2="{y2}" stroke="#999"/>')
    for n, (x, y) in xy.items():
        shape = str(n.outputs[0].type) if n.outputs else ""
        out.append(f'<g><title>{html.escape(n.name)}</title>'
                   f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="4" '
                   f'fill="{_color(n.op)}" stroke="#444"/>'
                   f'<text x="{x + 6}" y="{y + 14}" font-weight="bold">{html.escape(n.op)}</text>'
                   f'<text x="{x + 6}" y="{y + 27}" fill="#333">{html.escape(shape[:22])}</text></g>')
    return out, width, height


def _svg(parts: list[tuple[list[str], int, int]]) -> str:
    width = sum(w for _, w, _ in parts)
    height = max(h for _, _, h in parts)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">']
    x = 0
    for elements, w, _ in parts:
        out.append(f'<g transform="translate({x},0)">')
        out += elements
        out.append("</g>")
        x += w
    out.append("</svg>")
    return "\n".join(out)


def to_svg(graph: Graph, layer: int | None = None) -> str:
    nodes, title = select_nodes(graph, layer)
    return _svg([_render(nodes, title)])


def to_svg_side_by_side(before: Graph, after: Graph, layer: int = 1) -> str:
    """One transformer layer before and after the passes, next to each other."""
    parts = []
    for graph, when in ((before, "before"), (after, "after")):
        nodes = layer_nodes(graph, layer) or graph.nodes[:_MAX_NODES]
        parts.append(_render(nodes, f"layer {layer} {when} the passes ({len(nodes)} nodes)"))
    return _svg(parts)


def _color(op: str) -> str:
    if op in ("matmul", "attention"):
        return "#f6c9a0"
    if op in ("layer_norm", "rms_norm", "softmax"):
        return "#b9dcf2"
    if op in ("shape", "reshape", "transpose", "squeeze", "unsqueeze", "concat", "slice",
              "gather", "expand", "split", "range", "constant_of_shape", "cast"):
        return "#e8e8e8"
    return "#d5f0c8"
