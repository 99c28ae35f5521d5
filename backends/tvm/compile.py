"""Compile a passed graph to one TVM library and a static plan of kernel calls.

Every node becomes a call of a kernel; equal kernels are built once (the layers of a model share
theirs). The plan names values, not tensors: the runtime binds them to its buffers. The KV cache
is the runtime's: `rope_cache` takes the merged QKV projection (the input of the split that
feeds it) and writes each layer's caches in place at the current length; attention reads them.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace

from llmc.ir.graph import Graph, Node

from ..knobs import Chooser
from ..plan import Step, UnsupportedGraph, node_key, plan_nodes
from ..cache_layout import attention_args, kv_int8, kv_order, kv_pages, lay_out_caches, rope_cache_args
from . import attention, injective, int_dot, linear, measure, rope_cache

__all__ = ["Step", "UnsupportedGraph", "lay_out_caches", "compile_graph", "plan_graph", "weights"]

log = logging.getLogger(__name__)


def _func(make):
    """A builder of one named PrimFunc (`plan.plan_nodes`); `make` takes the kernel's name."""
    return lambda name: {name: make(name).with_attr("global_symbol", name)}


def _plan_node(node: Node, graph: Graph, target: dict, isa: str | None, registers: tuple[int, int], choose):
    """(kernel key, kernel builder, [step]) for one node; UnsupportedGraph for a node no kernel
    runs. `isa`: the target's integer dot-product instructions (`int_dot.choose`); `registers`:
    its vector registers (`target.vector_registers`); `choose`: the configuration a kernel with
    knobs is built with (`knobs.Chooser`)."""
    if node.op == "fused_linear":
        spec = linear.LinearSpec.of(node, graph)
        if spec.act_block:
            spec = replace(spec, isa=isa or "")
        slots = dict(zip(["x", "w", "bias", "residual", "norm_scale", "norm_bias", "w_scale", "w_zero"], node.inputs))
        values = [slots[a] for a in spec.arg_names()[:-1]] + [node.outputs[0]]
        args = [v.name + (spec.packing(a) or "") for v, a in zip(values, spec.arg_names())]
        # activations (x, residual, y) as rows [rows, features]; weights as they are packed
        views = tuple(_rows(v) if v.name not in graph.params else None for v in values)

        def make(name):
            config = choose(name, repr(spec), linear.knobs(spec, registers),
                            functools.partial(measure.measure_linear, spec, target))
            return linear.schedule(spec, config).mod["main"]
        return repr(spec), _func(make), [Step("", "linear", tuple(args), views=views)]
    int8, pages = kv_int8(graph), kv_pages(graph)
    if node.op == "attention":
        spec = replace(attention.AttentionSpec.of(node), kv_int8=int8, order=kv_order(graph), page_tokens=pages)
        return repr(spec), _func(lambda name: attention.function(spec)), [Step(
            "", "attention", attention_args(node, graph), () if spec.masked else ("total",))]
    if node.op == "rope_cache":
        qkv, offset, args = rope_cache_args(node, graph)
        spec = replace(rope_cache.RopeCacheSpec.of(node), row_width=qkv.shape[-1], offset=offset, kv_int8=int8,
                       order=kv_order(graph), page_tokens=pages)
        args, views = rope_cache.args_and_views(node, args)
        # a paged cache's writer takes each sequence's length (an argument), not the step's past
        return repr(spec), _func(lambda name: rope_cache.prim_func(spec)), [Step(
            "", "rope_cache", args, () if pages else ("past",), views)]
    shared = _tied_table(node, graph)
    if shared:
        ids, rows = node.inputs[1].name, node.outputs[0].name
        return "packed_" + node_key(node), _func(lambda name: linear.gather_packed(node)), [Step(
            "", "injective", (shared, ids, rows), tuple(injective.dim_names(node)))]
    if node.op in injective.LOWERINGS:
        key = node_key(node)
        args = [v.name for pos, v in enumerate(node.inputs)
                if v is not None and not (node.op in ("reshape", "expand") and pos == 1)]
        return key, _func(lambda name: injective.prim_func(node)), [Step(
            "", "injective", tuple(args + [v.name for v in node.outputs]), tuple(injective.dim_names(node)))]
    raise UnsupportedGraph(f"{node.name}: no TVM kernel for op {node.op!r}", node.name)


def _rows(value):
    """The view of an activation [..., k] as a GEMM kernel takes it, [rows, k] (None when it is
    so already)."""
    if len(value.shape) <= 2:
        return None
    return (math.prod(value.shape[:-1]), value.shape[-1])


def _tied_table(node: Node, graph: Graph) -> str | None:
    """For the token embedding's lookup in a table equal to the LM head's weight (a tied
    embedding, also after both are quantized to int8 rows), the name of the head's packed
    weight to read it from; else None. Other packings (the integer kernels') are not shared."""
    import numpy as np

    if node.op != "gather" or node.attrs["axis"] != 0:
        return None
    table = graph.const_value(node.inputs[0])
    if table is None or table.ndim != 2:
        return None
    for head in graph.nodes:
        if head.op != "fused_linear" or head.outputs[0] not in graph.outputs:
            continue
        w = graph.const_value(head.inputs[1])
        packing = linear.LinearSpec.of(head, graph).packing("w")
        if packing == ".packed16" and w is not None and w.shape == table.shape and w.dtype == table.dtype \
                and np.array_equal(w, table):
            return head.inputs[1].name + packing
    return None


def weights(graph: Graph, plan: list[Step]) -> dict:
    """The weights the plan reads: graph parameters, and GEMM weights packed for the kernel;
    each a function making it, so that the artifact is written one weight at a time."""
    import functools

    out = {}
    for name in {a for step in plan for a in step.args if a}:
        packed = next((sfx for sfx in linear.PACKINGS if name.endswith(sfx)), None)
        if packed:
            out[name] = functools.partial(_packed, graph.store, name[:-len(packed)], linear.PACKINGS[packed])
        elif name in graph.params:
            out[name] = functools.partial(graph.store.__getitem__, name)
    return out


def _packed(store, name: str, pack):
    return pack(store[name])


def compile_graph(graph: Graph, target: dict, tuner=None):
    """Returns (built TVM executable, kernel table, plan, {kernel: its configuration and where it
    came from}). Without a tuner every kernel takes its knobs' defaults."""
    import tvm

    choose = Chooser(tuner)
    funcs, plan = plan_graph(graph, target, choose)
    executable = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(target))
    return executable, sorted(funcs), plan, choose.configs


def plan_graph(graph: Graph, target: dict, choose=None):
    """(kernels by name, plan) for `target`, nothing built yet; UnsupportedGraph names a node no
    kernel runs."""
    import tvm

    from .target import vector_registers

    isa, registers = int_dot.choose(tvm.target.Target(target)), vector_registers(target)
    choose = choose or Chooser()
    return plan_nodes(graph, lambda node: _plan_node(node, graph, target, isa, registers, choose))
