"""Ops that passes produce: folded shape values, linear layers, recognized activations, rotary
embeddings and the fused kernels. Each is defined by its numpy reference, like every other op."""

from __future__ import annotations

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import TensorType
from .elementwise import sigmoid
from .infer import same_dtype
from .nn import _f32
from .registry import REQUIRED, register


# dims -----------------------------------------------------------------------------------------
def _dims_infer(inputs, values):
    return [TensorType((len(values),), DType.i64)]


@register("dims", (), {"values": REQUIRED}, infer=_dims_infer, sym=lambda inputs, values: tuple(values))
def dims(values):
    """A shape computed from the symbolic dims (batch, seq, ...) bound at run time; replaces the
    exporters' Shape/Gather/Concat arithmetic. The executor evaluates `values` before the call."""
    return np.array(values, np.int64)


# linear ---------------------------------------------------------------------------------------
def _linear_infer(inputs, **_):
    x, w = inputs[:2]
    same_dtype("linear", [x, w])
    if w.type.rank != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight {w.type} does not fit input {x.type}")
    return [x.type.with_shape(x.shape[:-1] + (w.shape[0],))]


@register("linear", ("x", "w", "bias?"), infer=_linear_infer)
def linear(x, w, bias=None):
    """x @ w.T + bias, with w laid out [out_features, in_features]."""
    y = np.matmul(_f32(x), _f32(w).T)
    if bias is not None:
        y = y + _f32(bias)
    return y.astype(x.dtype)


def _same_type(inputs, **_):
    return [inputs[0].type]


@register("silu", ("x",), infer=_same_type)
def silu(x):
    """x * sigmoid(x)."""
    return (x * sigmoid(x)).astype(x.dtype)


# rotary ---------------------------------------------------------------------------------------
def _rotary_infer(inputs, **_):
    return [inputs[0].type]


@register("rotary", ("x", "cos", "sin"), infer=_rotary_infer)
def rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2]):
    the rotary embedding as Llama, NeoX and Phi write it (applied to the rotary part of x)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)
