"""Merge linear layers that read the same input (Q, K and V; gate and up) into one GEMM whose
weight is concatenated once, at compile time, followed by a split. Siblings that cannot merge
(one with a bias and one without, a weight computed at run time) are reported."""

from __future__ import annotations

import functools

import numpy as np

from llmc.ir.graph import Graph

from .manager import Pass, PassContext
from .pattern import NearMiss


def _merge(graph: Graph, ctx: PassContext) -> Graph:
    report = ctx.current
    for x, readers in graph.consumers().items():
        group = [n for n in readers if n.op == "linear" and n.inputs[0] is x]
        if len(group) < 2:
            continue
        if any(graph.const_value(n.inputs[1]) is None for n in group):
            report.near_misses.append(NearMiss("merge_linears", group[0].name,
                                               f"a weight of a linear reading {x.name} is not constant"))
            continue
        with_bias = {len(n.inputs) > 2 and n.inputs[2] is not None for n in group}
        if len(with_bias) > 1:
            report.near_misses.append(NearMiss("merge_linears", group[0].name,
                                               f"linears reading {x.name} differ in having a bias"))
            continue
        weights = [graph.const_value(n.inputs[1]) for n in group]
        # made when read (`WeightStore.add`): the merged copy costs no memory until it is packed
        w = graph.add_param(f"{group[0].name}.merged_w", functools.partial(np.concatenate, weights, axis=0))
        inputs = [x, w]
        if with_bias.pop():
            inputs.append(graph.add_param(f"{group[0].name}.merged_b", np.concatenate(
                [graph.const_value(n.inputs[2]) for n in group])))
        first = group[0]
        (y,) = graph.add_node("linear", inputs, name=f"{first.name.split('.')[0]}.merged", scope=first.scope)
        parts = graph.add_node("split", [y], {"axis": -1, "sizes": tuple(wt.shape[0] for wt in weights),
                                             "num_outputs": len(group)},
                               name=f"{first.name.split('.')[0]}.split", scope=first.scope)
        for n, part in zip(group, parts):
            graph.replace_uses(n.outputs[0], part)
        report.rewrites[f"merge {len(group)} linears"] += 1
    graph.remove_dead()
    graph.toposort()
    return graph


fuse_qkv = Pass("fuse_qkv", _merge)
