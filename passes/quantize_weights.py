"""Weight-only quantization of the GEMMs (`quant` option: "w8" or "w4").

Every `fused_linear` over a constant weight gets its weight quantized once, here, and keeps
computing in f32: the kernel dequantizes as it reads (the op's definition is
`ops.transformer.dequantize`). Norms, biases, embeddings and activations stay in full precision.

- w8: int8, symmetric, one scale per output channel (max |w| / 127).
- w4: 4-bit, one scale per group of `group_size` consecutive input features and output
  channel; symmetric (zero 8, the scale the group's signed extreme / -8, as llama.cpp's Q4_0:
  the scale may be negative) or, with `zero_point`, asymmetric ((max - min) / 15 and a zero per
  group). A GEMM whose input size is not a multiple of the group
  size uses the largest group size dividing both.

The LM head (the GEMM that writes the logits) has its own encoding, `lm_head`: "f32", "w8" or
"w4"; by default w8 (with w4 too: at 4 bits the head's error reaches the logits directly, and at
8 bits it costs a quarter of its f32 bytes).

GEMMs imported already quantized (onnxruntime's MatMulNBits) keep their weights; without the
`quant` option they are recorded in `graph.metadata["quant"]` as imported.
The token embedding (the constant table gathered with one row per logit) goes to int8 rows
with one scale per row, gathered and scaled on lookup (`embedding` "w8", the default; "f32"
keeps it). Decoding reads one row per token, so this saves artifact size and memory (a quarter
of the table's bytes), not time; llama.cpp's quantized models do the same.
"""

from __future__ import annotations

import math

import numpy as np

from llmc.ir.dtypes import DType
from llmc.ir.graph import Graph
from llmc.options import QuantSpec

from .manager import Pass, PassContext
from .pattern import Const, Op, Rule, Var, apply_rules

DEFAULT_GROUP_SIZE = 128


def quantize(w: np.ndarray, quant: str, group_size: int = DEFAULT_GROUP_SIZE, zero_point: bool = False):
    """(q, scale, zero or None) for an f32 weight [n, k]; `dequantize` inverts it up to rounding."""
    w = np.asarray(w, np.float32)  # one temporary the weight's size at a time: it may be the embedding
    if quant == "w8":
        scale = np.maximum(w.max(axis=1), -w.min(axis=1)) / 127
        scale[scale == 0] = 1
        q = w / scale[:, None]
        np.rint(q, out=q)
        np.clip(q, -127, 127, out=q)
        return q.astype(np.int8), scale, None
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    if zero_point:
        lo, hi = np.minimum(groups.min(axis=2), 0), np.maximum(groups.max(axis=2), 0)
        scale = (hi - lo) / 15
        scale[scale == 0] = 1
        zero = np.clip(np.rint(-lo / scale), 0, 15)
    else:
        # as llama.cpp's Q4_0: the group's extreme, with its sign, maps to level -8 (the scale
        # takes the sign), so all 16 levels serve; max|w| / 7 would leave one unused
        extreme = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[..., None], axis=2)[..., 0]
        scale = extreme / -8
        scale[scale == 0] = 1
        zero = np.full_like(scale, 8)
    q = groups / scale[..., None]  # in place from here: the pass runs over every weight
    np.rint(q, out=q)
    q += zero[..., None]
    np.clip(q, 0, 15, out=q)
    return q.astype(np.uint8).reshape(n, k), scale.astype(np.float32), zero.astype(np.float32)


def _rule(spec: QuantSpec, logits: set) -> Rule:
    def scheme(node) -> str:
        return spec.lm_head if node.outputs[0] in logits else spec.scheme

    def check(m):
        node = m.nodes["gemm"]
        if node.attrs["quant"]:
            return "already quantized"
        if scheme(node) == "f32":
            return "the LM head stays in full precision (lm_head)"
        if scheme(node) == "w4" and node.inputs[1].shape[1] % 2:
            return "w4 needs an even number of input features"
        return None

    def build(m, b):
        node = m.nodes["gemm"]
        quant = scheme(node)
        w = m.data("w")
        g = math.gcd(w.shape[1], spec.group_size) if quant == "w4" else 0
        q, scale, zero = quantize(w, quant, g, spec.zero_point)
        inputs = (list(node.inputs) + [None] * 6)[:6]
        inputs[1] = b.param(q, f"{node.name}.q{quant[1:]}")
        inputs += [b.param(scale, f"{node.name}.scale"), b.param(zero, f"{node.name}.zero") if zero is not None else None]
        return b.emit("fused_linear", inputs, **{**node.attrs, "quant": quant, "group_size": g})

    return Rule("quantize", Op("fused_linear", Var("x"), Const("w"), bind="gemm", rest=True), build,
                check=check)


def _embedding_rule(vocab: int) -> Rule:
    def check(m):
        table = m.data("table")
        if m.nodes["lookup"].attrs["axis"] != 0 or table.ndim != 2 or table.dtype != np.float32:
            return "not a row lookup in an f32 table"
        if table.shape[0] != vocab:
            return f"{table.shape[0]} rows, not one per logit ({vocab}): not the token embedding"
        return None

    def build(m, b):
        node, ids = m.nodes["lookup"], m.values["ids"]
        q, scale, _ = quantize(m.data("table"), "w8")
        rows = b.emit("gather", [b.param(q, f"{node.name}.q8"), ids], axis=0)
        scales = b.emit("gather", [b.param(scale, f"{node.name}.scale"), ids], axis=0)  # 1-D: no match again
        return b.emit("mul", [b.emit("cast", [rows], to=DType.f32), b.emit("unsqueeze", [scales], axes=[-1])])

    return Rule("quantize_embedding", Op("gather", Const("table"), Var("ids"), bind="lookup"), build,
                check=check)


def _run(graph: Graph, ctx: PassContext) -> Graph:
    spec = ctx.options.quant
    if not spec:
        _record_imported(graph)
        return graph
    rules = [_rule(spec, set(graph.outputs))]
    if spec.embedding == "w8":
        rules.append(_embedding_rule(graph.outputs[0].shape[-1]))
    apply_rules(graph, rules, ctx.current.rewrites, ctx.current.near_misses)
    graph.metadata["quant"] = {"scheme": spec.scheme, "group_size": spec.group_size if spec.scheme == "w4" else 0,
                               "zero_point": spec.zero_point, "lm_head": spec.lm_head, "embedding": spec.embedding}
    return graph


def _record_imported(graph: Graph) -> None:
    """GEMMs that came quantized (MatMulNBits) are recorded as the quant option's would be."""
    gemms = [n for n in graph.nodes if n.op == "fused_linear" and n.attrs["quant"]]
    if not gemms:
        return
    head = next((n.attrs["quant"] for n in gemms if n.outputs[0] in graph.outputs), "f32")
    zeros = [graph.const_value(n.inputs[7]) for n in gemms if len(n.inputs) > 7 and n.inputs[7] is not None]
    graph.metadata["quant"] = {"scheme": gemms[0].attrs["quant"], "group_size": min(n.attrs["group_size"] for n in gemms),
                               "zero_point": any(bool((z != 8).any()) for z in zeros if z is not None),
                               "lm_head": head, "embedding": "f32", "imported": True}


quantize_weights = Pass("quantize_weights", _run)
