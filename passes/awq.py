"""Activation-aware scaling before 4-bit quantization (AWQ-style; the `awq` option with w4).

Input features that carry large activations matter more to a GEMM's output than their weights'
size says. Scaling weight column k up by s_k (and the activation down by s_k, which the norm
prologue absorbs: its scale and shift divide by s) gives those columns finer quantization steps
for the same output. Per GEMM, s = mean|h|^alpha (h: the normalized GEMM
input on calibration tokens, normalized so the scales' geometric mean is 1), with alpha searched
on a grid for the smallest output error after quantization; alpha = 0 is plain round-to-nearest,
so the search never does worse than it on the calibration data. Then, as AWQ does, each group of
each output row is clipped to the fraction of its range (1 down to 0.525) that minimizes that
group's output error on the same inputs: a clipped outlier costs less than coarser steps for
the whole group. The clipping applies to every GEMM, including those whose scales have nowhere
to fold.

The activations' inverse scale folds into the norm prologue of the GEMM, or, for a GEMM reading a
gated GEMM (the MLP down projection after SwiGLU/GeGLU), into the up half of that GEMM's weight
rows. The attention output projection is clipped but not scaled (its scales would have to fold
into the value rows, shared between query heads).

Calibration data: token ids given as the `calibration` option (the driver gives real text's:
`--calibration-text`, by default an English sample llmc ships), or, for a model without a
tokenizer, tokens drawn from the model's own vocabulary (seeded): random ids calibrate poorly (on
SmolLM2 they made w4 worse than plain rounding), so the driver warns.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from llmc.frontends.roles import prompt_feeds
from llmc.ir.graph import Graph
from llmc.ops import get_op
from llmc.ops.transformer import dequantize

from .manager import Pass, PassContext
from .pattern import NearMiss
from .quantize_weights import DEFAULT_GROUP_SIZE, quantize

log = logging.getLogger(__name__)

ALPHAS = np.linspace(0, 1, 11)
CLIP_RATIOS = 1 - np.arange(20) / 40  # AWQ's grid: down to 0.525 of the range
BLOCK_ROWS = 64
CALIBRATION_TOKENS = 128


def search_scales(h: np.ndarray, w: np.ndarray, group_size: int, zero_point: bool):
    """(scales or None, error of plain rounding, error with the scales) for GEMM input rows h
    [t, k] and weight w [n, k]."""
    magnitude = np.abs(h).mean(axis=0) + 1e-8
    # magnitude^alpha with a geometric mean of 1; alpha 0 is plain rounding
    candidates = [np.exp(alpha * (np.log(magnitude) - np.log(magnitude).mean())).astype(np.float32)
                  for alpha in ALPHAS]
    inputs = [h / s for s in candidates]
    errors = np.zeros(len(candidates))
    for r in range(0, w.shape[0], BLOCK_ROWS):  # a block of rows at a time stays in cache
        rows = w[r:r + BLOCK_ROWS]
        want = h @ rows.T
        for i, s in enumerate(candidates):
            q, scale, zero = quantize(rows * s, "w4", group_size, zero_point)
            errors[i] += np.square(inputs[i] @ dequantize(q, scale, zero, "w4", group_size).T - want).sum()
    best = int(np.argmin(errors))
    return (candidates[best] if best else None), math.sqrt(errors[0]), math.sqrt(errors[best])


def search_clip(x: np.ndarray, w: np.ndarray, group_size: int, zero_point: bool) -> np.ndarray:
    """w [n, k] with each row's groups clipped to the range that minimizes the group's output
    error after 4-bit quantization, on GEMM input rows x [t, k]. A group's error is
    e^T (x_g^T x_g) e for its weight error e, so one Gram matrix per group serves every ratio."""
    n, k = w.shape
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size).transpose(1, 0, 2)
    gram = xg.transpose(0, 2, 1) @ xg  # [groups, G, G]
    out = np.empty_like(w)
    for r in range(0, n, BLOCK_ROWS):  # a block of rows at a time stays in cache
        wg = w[r:r + BLOCK_ROWS].reshape(-1, groups, group_size)
        top = np.abs(wg).max(axis=2, keepdims=True)
        best, best_err = wg, np.full(wg.shape[:2], np.inf, np.float32)
        for ratio in CLIP_RATIOS:
            clipped = np.clip(wg, -ratio * top, ratio * top)
            q, scale, zero = quantize(clipped.reshape(-1, k), "w4", group_size, zero_point)
            e = (dequantize(q, scale, zero, "w4", group_size).reshape(wg.shape) - wg).transpose(1, 0, 2)
            err = np.einsum("gni,gni->ng", e @ gram, e)
            best = np.where((err < best_err)[..., None], clipped, best)
            best_err = np.minimum(err, best_err)
        out[r:r + BLOCK_ROWS] = best.reshape(-1, k)
    return out


class _NormFold:
    """The GEMM's own norm prologue: h = norm(x); dividing its scale (and shift) by s gives h / s."""

    def __init__(self, graph, node):
        self.graph, self.node = graph, node
        self.gamma, self.beta = (graph.const_value(v) for v in (list(node.inputs) + [None] * 6)[4:6])

    def input(self, x):
        rms = self.node.attrs["norm"] == "rms"
        norm = get_op("rms_norm" if rms else "layer_norm")
        return norm.ref(x, *((self.gamma,) if rms else (self.gamma, self.beta)), epsilon=self.node.attrs["epsilon"])

    def divide(self, s):
        node, graph = self.node, self.graph
        node.inputs[4] = graph.add_param(f"{node.name}.awq_scale", (self.gamma / s).astype(self.gamma.dtype))
        if self.beta is not None:
            node.inputs[5] = graph.add_param(f"{node.name}.awq_bias", (self.beta / s).astype(self.beta.dtype))


class _GateFold:
    """A gated GEMM (SwiGLU/GeGLU) whose only reader is this GEMM: x = act(gate) * up, so dividing
    the up half's weight rows (and bias) by s gives x / s."""

    def __init__(self, graph, producer):
        self.graph, self.producer = graph, producer

    def input(self, x):
        return x

    def divide(self, s):
        p, graph = self.producer, self.graph
        w = graph.const_value(p.inputs[1]).astype(np.float32)
        n = w.shape[0] // 2
        w = np.concatenate([w[:n], w[n:] / s[:, None]])
        p.inputs[1] = graph.add_param(f"{p.name}.awq_up", np.require(w, requirements="C"))
        bias = graph.const_value(p.inputs[2]) if len(p.inputs) > 2 else None
        if bias is not None:
            p.inputs[2] = graph.add_param(f"{p.name}.awq_up_bias", np.concatenate([bias[:n], bias[n:] / s]))


def _fold_target(graph, node, consumers):
    """Where the inverse of a GEMM's input scales can go, or None."""
    if node.attrs["norm"]:
        return _NormFold(graph, node)
    p = node.inputs[0].producer
    if p is not None and p.op == "fused_linear" and p.attrs["gated"] and not p.attrs["quant"] \
            and graph.const_value(p.inputs[1]) is not None and consumers[node.inputs[0]] == [node] \
            and (len(p.inputs) < 4 or p.inputs[3] is None) and node.inputs[0] not in graph.outputs:
        return _GateFold(graph, p)
    return None


def _run(graph: Graph, ctx: PassContext) -> Graph:
    spec = ctx.options.quant
    if not (spec and spec.awq):  # (QuantSpec admits awq with w4 only)
        return graph
    from llmc.ir.evaluate import run_reference

    tokens = spec.calibration
    if not tokens:
        vocab = graph.outputs[0].shape[-1]  # the logits' last dim
        tokens = np.random.default_rng(0).integers(0, vocab, CALIBRATION_TOKENS).tolist()
    group = spec.group_size
    head_quantized = spec.lm_head == "w4"
    consumers = graph.consumers()
    gemms = [n for n in graph.nodes if n.op == "fused_linear" and not n.attrs["quant"]
             and graph.const_value(n.inputs[1]) is not None and (head_quantized or n.outputs[0] not in graph.outputs)]
    # only the GEMMs' inputs are kept (not every activation, nor the logits), each until its last GEMM
    inputs = {v.name: v for v in (n.inputs[0] for n in gemms)}
    seen = run_reference(graph, prompt_feeds(graph, np.array([list(tokens)])), targets=list(inputs.values()))
    last = {n.inputs[0].name: i for i, n in enumerate(gemms)}
    from llmc.progress import bar

    for i, node in enumerate(bar(gemms, desc="AWQ search, GEMMs")):
        log.info("awq: %s (%d/%d)", node.name, i + 1, len(gemms))
        w = graph.const_value(node.inputs[1]).astype(np.float32)
        group_size, zero_point = math.gcd(w.shape[1], group), spec.zero_point
        x = seen.pop(node.inputs[0].name) if last[node.inputs[0].name] == i else seen[node.inputs[0].name]
        h = x.reshape(-1, w.shape[1]).astype(np.float32)
        fold = _fold_target(graph, node, consumers)
        s = None
        if fold is None:
            ctx.current.near_misses.append(NearMiss("awq", node.name, "no norm prologue or gated GEMM before it "
                                                    "to fold the scales into: clipped only"))
        else:
            h = fold.input(h)
            s, _, _ = search_scales(h, w, group_size, zero_point)
        if s is not None:
            h, w = h / s, w * s
            fold.divide(s)
        node.inputs[1] = graph.add_param(f"{node.name}.awq_w", search_clip(h, w, group_size, zero_point))
        ctx.current.rewrites["scaled and clipped" if s is not None else "clipped"] += 1
    graph.remove_dead()
    return graph


awq = Pass("awq", _run)
