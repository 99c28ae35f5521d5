"""Activation-aware scaling before 4-bit quantization (AWQ-style; the `awq` option with w4).

Input features that carry large activations matter more to a GEMM's output than their weights'
size says. Scaling weight column k up by s_k (and the activation down by s_k, which the norm
prologue absorbs: its scale and shift divide by s) gives those columns finer quantization steps
for the same output. Per GEMM with a norm prologue, s = mean|h|^alpha (h: the normalized GEMM
input on calibration tokens, normalized so the scales' geometric mean is 1), with alpha searched
on a grid for the smallest output error after quantization; alpha = 0 is plain round-to-nearest,
so the search never does worse than it on the calibration data.

Calibration data: token ids given as the `calibration` option, or tokens drawn from the model's
own vocabulary (seeded). GEMMs without a norm prologue (attention output, MLP down projection)
keep plain rounding: their scales would have to fold into the previous GEMM's output rows.
"""

from __future__ import annotations

import math

import numpy as np

from llmc.ir.graph import Graph
from llmc.ops import get_op
from llmc.ops.transformer import dequantize

from .manager import Pass, PassContext
from .pattern import NearMiss
from .quantize_weights import DEFAULT_GROUP_SIZE, quantize

ALPHAS = np.linspace(0, 1, 11)
CALIBRATION_TOKENS = 128


def _feeds(graph: Graph, tokens: list[int]) -> dict[str, np.ndarray]:
    n = len(tokens)
    env = {"batch": 1, "seq": n, "past": 0, "total": n}
    feeds = {}
    for v in graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = np.array([tokens], np.int64)
        elif v.name == "attention_mask":
            feeds[v.name] = np.ones((1, n), np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.arange(n, dtype=np.int64)[None]
        else:  # an empty past
            feeds[v.name] = np.zeros(v.type.concrete(env), v.dtype.numpy())
    return feeds


def search_scales(h: np.ndarray, w: np.ndarray, group_size: int, zero_point: bool):
    """(scales or None, error of plain rounding, error with the scales) for GEMM input rows h
    [t, k] and weight w [n, k]."""
    want = h @ w.T
    magnitude = np.abs(h).mean(axis=0) + 1e-8

    def error(s):
        q, scale, zero = quantize(w * s, "w4", group_size, zero_point)
        return float(np.linalg.norm((h / s) @ dequantize(q, scale, zero, "w4", group_size).T - want))

    best, best_err = None, error(np.ones_like(magnitude))
    plain = best_err
    for alpha in ALPHAS[1:]:
        s = magnitude ** alpha
        s /= math.exp(np.log(s).mean())
        err = error(s)
        if err < best_err:
            best, best_err = s.astype(np.float32), err
    return best, plain, best_err


def _run(graph: Graph, ctx: PassContext) -> Graph:
    options = ctx.options
    if not options.get("awq"):
        return graph
    if options.get("quant") != "w4":
        raise ValueError("activation-aware scaling (awq) applies to w4 quantization")
    from llmc.backends.reference import run_reference

    tokens = options.get("calibration")
    if not tokens:
        vocab = graph.outputs[0].shape[-1]  # the logits' last dim
        tokens = np.random.default_rng(0).integers(0, vocab, CALIBRATION_TOKENS).tolist()
    trace = {}
    run_reference(graph, _feeds(graph, list(tokens)), trace=trace)
    group = options.get("group_size", DEFAULT_GROUP_SIZE)
    head_quantized = options.get("lm_head") == "w4"
    for node in graph.nodes:
        if node.op != "fused_linear" or node.attrs["quant"]:
            continue
        if node.outputs[0] in graph.outputs and not head_quantized:
            continue
        w = graph.const_value(node.inputs[1])
        if not node.attrs["norm"] or w is None:
            ctx.current.near_misses.append(NearMiss("awq", node.name, "no norm prologue to fold the scales into"))
            continue
        x, _, _, _, gamma, beta = (list(node.inputs) + [None] * 6)[:6]
        x = trace[x].reshape(-1, w.shape[1]).astype(np.float32)
        gamma, beta = graph.const_value(gamma), graph.const_value(beta)
        norm = get_op("rms_norm" if node.attrs["norm"] == "rms" else "layer_norm")
        args = (gamma,) if node.attrs["norm"] == "rms" else (gamma, beta)
        h = norm.ref(x, *args, epsilon=node.attrs["epsilon"])
        s, plain, scaled = search_scales(h, w.astype(np.float32), math.gcd(w.shape[1], group),
                                         options.get("zero_point", False))
        if s is None:
            continue
        node.inputs[1] = graph.add_param(f"{node.name}.awq_w", np.require(w * s, requirements="C"))
        node.inputs[4] = graph.add_param(f"{node.name}.awq_scale", (gamma / s).astype(gamma.dtype))
        if beta is not None:
            node.inputs[5] = graph.add_param(f"{node.name}.awq_bias", (beta / s).astype(beta.dtype))
        ctx.current.rewrites[f"scaled (error {scaled / plain:.0%} of rounding's)"] += 1
    graph.remove_dead()
    return graph


awq = Pass("awq", _run)
