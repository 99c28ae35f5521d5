"""Half-precision GEMM weights (`dtype` option "fp16"): every `fused_linear` over a constant f32
weight gets it in f16, rounded once, here. The kernels read half the bytes (decode is bound by
them) and feed the tensor cores f16 tiles; sums stay f32, and so do the activations between
kernels, the norms, biases and the embedding table (decoding reads one row of it per token).
GEMMs already quantized (w8, w4) keep their encoding."""

from __future__ import annotations

import numpy as np

from llmc.ir.graph import Graph

from .manager import Pass, PassContext
from .pattern import Const, Op, Rule, Var, apply_rules


def _rule() -> Rule:
    def check(m):
        node = m.nodes["gemm"]
        if node.attrs["quant"]:
            return "quantized weights keep their encoding"
        if m.data("w").dtype != np.float32:
            return f"a {m.data('w').dtype} weight"
        return None

    def build(m, b):
        node = m.nodes["gemm"]
        inputs = list(node.inputs)
        inputs[1] = b.param(m.data("w").astype(np.float16), f"{node.name}.f16")
        return b.emit("fused_linear", inputs, **node.attrs)

    return Rule("half_weights", Op("fused_linear", Var("x"), Const("w"), bind="gemm", rest=True), build,
                check=check)


def _run(graph: Graph, ctx: PassContext) -> Graph:
    if ctx.options.dtype == "fp16":
        apply_rules(graph, [_rule()], ctx.current.rewrites, ctx.current.near_misses)
    return graph


half_weights = Pass("half_weights", _run)
