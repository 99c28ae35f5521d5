"""Int8 activations for the quantized GEMMs (`activations` option "int8"): every `fused_linear`
with w8 or w4 weights gets `act_block` = 32. Its input (after the norm prologue) is then
quantized on the fly to int8 in blocks of 32 features, one scale per block (max |h| / 127, as
llama.cpp's q8_0 activations), and the kernels multiply integers (VNNI or AVX2 dot products,
`backends/tvm/int_dot.py`): at 8 and 4 bits the f32 arithmetic of dequantizing, not memory,
sets the speed otherwise. The op's definition says exactly what is computed
(`ops.transformer.quantize_activations`); `llmc quant-report` measures what it costs.

The LM head keeps f32 activations: its error reaches the logits directly (on the trained Llama,
top-1 agreement of w8 over 511 held-out tokens: 99.0% with an int8 head input, 99.2% without,
99.4% with f32 activations everywhere); on AVX2 its int8 kernel is no faster than the f32 one.
A GEMM whose input size or weight groups are not whole blocks keeps f32 activations too."""

from __future__ import annotations

from llmc.ir.graph import Graph

from .manager import Pass, PassContext
from .pattern import Op, Rule, Var, apply_rules

BLOCK = 32


def _rule(logits: set) -> Rule:
    def check(m):
        node = m.nodes["gemm"]
        if node.outputs[0] in logits:
            return "the LM head keeps f32 activations: its error reaches the logits directly"
        if not node.attrs["quant"]:
            return "full-precision weights keep f32 activations"
        if node.attrs["act_block"]:
            return "already int8"
        k = node.inputs[1].shape[1]
        if k % BLOCK or (node.attrs["quant"] == "w4" and node.attrs["group_size"] % BLOCK):
            return f"{k} input features in groups of {node.attrs['group_size']}: not whole blocks of {BLOCK}"
        return None

    def build(m, b):
        node = m.nodes["gemm"]
        return b.emit("fused_linear", list(node.inputs), **{**node.attrs, "act_block": BLOCK})

    return Rule("int8_activations", Op("fused_linear", Var("x"), Var("w"), bind="gemm", rest=True), build,
                check=check)


def _run(graph: Graph, ctx: PassContext) -> Graph:
    if ctx.options.activations == "int8":
        apply_rules(graph, [_rule(set(graph.outputs))], ctx.current.rewrites, ctx.current.near_misses)
    if graph.metadata.get("quant"):
        graph.metadata["quant"]["activations"] = ctx.options.activations or "f32"
    return graph


quantize_activations = Pass("quantize_activations", _run)
