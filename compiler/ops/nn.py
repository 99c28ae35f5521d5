"""Compute ops: matmul, softmax, norms, reductions, attention.

Reference implementations compute half-precision inputs in float32 and round the result once,
as real kernels accumulate in float32.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir.graph import TensorType
from .infer import broadcast_shapes, normalize_axis, same_dtype
from .registry import register


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype == np.float16 or x.dtype.name == "bfloat16" else x


def _same_type(inputs, **_):
    return [inputs[0].type]


# matmul ---------------------------------------------------------------------------------------
def _matmul_infer(inputs):
    a, b = inputs
    dtype = same_dtype("matmul", [a, b])
    sa, sb = list(a.shape), list(b.shape)
    if len(sa) == 1:
        sa = [1] + sa
    if len(sb) == 1:
        sb = sb + [1]
    batch = broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    shape = list(batch) + ([sa[-2]] if a.type.rank > 1 else []) + ([sb[-1]] if b.type.rank > 1 else [])
    return [TensorType(tuple(shape), dtype)]


@register("matmul", ("a", "b"), infer=_matmul_infer)
def matmul(a, b):
    """numpy.matmul semantics (batched, broadcast, 1-D operands)."""
    return np.matmul(_f32(a), _f32(b)).astype(a.dtype)


# softmax --------------------------------------------------------------------------------------
def _softmax_f32(x, axis):
    x = _f32(x)
    # A row that is all -inf gives NaN, as in ONNX; exporters guard against it with IsNaN/Where.
    with np.errstate(invalid="ignore"):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)


@register("softmax", ("x",), {"axis": -1}, infer=_same_type)
def softmax(x, axis):
    return _softmax_f32(x, axis).astype(x.dtype)


@register("log_softmax", ("x",), {"axis": -1}, infer=_same_type)
def log_softmax(x, axis):
    xf = _f32(x)
    shifted = xf - np.max(xf, axis=axis, keepdims=True)
    return (shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))).astype(x.dtype)


# norms ----------------------------------------------------------------------------------------
def _norm_axes(x, axis):
    return tuple(range(normalize_axis(axis, x.ndim), x.ndim))


@register("layer_norm", ("x", "scale", "bias?"), {"axis": -1, "epsilon": 1e-5}, infer=_same_type)
def layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5):
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the axes from `axis` on."""
    xf, axes = _f32(x), _norm_axes(x, axis)
    mean = xf.mean(axis=axes, keepdims=True)
    var = ((xf - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (xf - mean) / np.sqrt(var + np.float32(epsilon)) * _f32(scale)
    if bias is not None:
        y = y + _f32(bias)
    return y.astype(x.dtype)


@register("rms_norm", ("x", "scale"), {"axis": -1, "epsilon": 1e-5}, infer=_same_type)
def rms_norm(x, scale, axis=-1, epsilon=1e-5):
    """x / sqrt(mean(x^2) + epsilon) * scale over the axes from `axis` on."""
    xf, axes = _f32(x), _norm_axes(x, axis)
    y = xf / np.sqrt((xf * xf).mean(axis=axes, keepdims=True) + np.float32(epsilon))
    return (y * _f32(scale)).astype(x.dtype)


# reductions -----------------------------------------------------------------------------------
def reduction_axes(rank, axes):
    return tuple(range(rank)) if axes is None else tuple(sorted(normalize_axis(a, rank) for a in axes))


def _reduce_infer(inputs, axes, keepdims):
    x = inputs[0]
    red = reduction_axes(x.type.rank, axes)
    shape = [1 if i in red else d for i, d in enumerate(x.shape) if keepdims or i not in red]
    return [x.type.with_shape(shape)]


def _register_reduce(name, fn):
    @register(name, ("x",), {"axes": None, "keepdims": 1}, infer=_reduce_infer)
    def ref(x, axes, keepdims):
        out = fn(_f32(x), axis=reduction_axes(x.ndim, axes), keepdims=bool(keepdims))
        return np.asarray(out).astype(x.dtype)

    ref.__doc__ = f"{name} over `axes` (all when None)."


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
                   "reduce_min": np.min}.items():
    _register_reduce(_name, _fn)


# attention ------------------------------------------------------------------------------------
def _attention_infer(inputs, scale, is_causal, merge_heads, softcap):
    q, k, v = inputs[:3]
    same_dtype("attention", [q, k, v])
    for t in (k, v):
        if isinstance(q.shape[1], int) and isinstance(t.shape[1], int) and q.shape[1] % t.shape[1]:
            raise ValueError(f"attention: {q.shape[1]} query heads cannot share {t.shape[1]} kv heads")
    if merge_heads:
        return [q.type.with_shape((q.shape[0], q.shape[2], q.shape[1] * v.shape[-1]))]
    return [q.type.with_shape(q.shape[:-1] + v.shape[-1:])]


@register("attention", ("q", "k", "v", "mask?"), {"scale": None, "is_causal": 0, "merge_heads": 0, "softcap": 0.0},
          infer=_attention_infer)
def attention(q, k, v, mask=None, scale=None, is_causal=0, merge_heads=0, softcap=0.0):
    """softmax(q @ k^T * scale + mask) @ v over [batch, heads, seq, head_dim] tensors.

    k and v may have fewer heads than q (grouped-query attention: each k/v head serves
    heads_q / heads_kv query heads). `mask` is boolean (True attends) or additive, and broadcasts
    to [batch, heads, seq_q, seq_kv]. With `is_causal`, query i sees keys up to
    i + seq_kv - seq_q (the queries are the last seq_q positions). A query that sees no key at
    all gets zeros (as ONNX Attention defines it), not NaN. With `merge_heads` the output is
    [batch, seq, heads * head_dim], ready for the output projection. With `softcap` (Gemma 2)
    the scaled scores are soft-capped before the mask: softcap * tanh(scores / softcap).
    """
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(_f32(q), np.swapaxes(_f32(k), -1, -2)) * np.float32(scale)
    if softcap:
        scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
    s, t = scores.shape[-2:]
    if is_causal:
        visible = np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)
        scores = np.where(visible, scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f32(mask)
    blind = np.isneginf(scores.max(axis=-1, keepdims=True))
    probs = np.where(blind, 0.0, _softmax_f32(np.where(blind, 0.0, scores), -1))
    y = np.matmul(probs.astype(np.float32), _f32(v)).astype(q.dtype)
    if merge_heads:
        b, h, s_, d = y.shape
        y = y.transpose(0, 2, 1, 3).reshape(b, s_, h * d)
    return y
