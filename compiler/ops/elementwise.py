"""Elementwise ops: unary math, binary arithmetic and comparison (numpy broadcasting), where, cast.

Binary arithmetic on small integer tensors also propagates their symbolic contents, which is
how exporters' shape arithmetic (`Shape(x)[1] + past`) stays symbolic in the IR.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import TensorType
from ..ir.symbolic import dim_max, dim_min
from ..ir.symbolic import div as sym_div
from .infer import broadcast_shapes, elementwise, is_dim, same_dtype, sym_of
from .registry import register


def _sym_broadcast(fn, inputs):
    """Apply `fn` elementwise to the symbolic contents of the inputs, with broadcasting."""
    syms = [sym_of(v) for v in inputs]
    if any(s is None for s in syms):
        return None
    rank = max(v.type.rank for v in inputs)
    if rank > 1:
        return None
    lists = [list(s) if isinstance(s, tuple) else [s] for s in syms]
    n = max(len(x) for x in lists)
    if any(len(x) not in (1, n) for x in lists):
        return None
    out = []
    for i in range(n):
        r = fn(*(x[i] if len(x) > 1 else x[0] for x in lists))
        if r is None:
            return None
        out.append(r)
    return tuple(out) if rank == 1 else out[0]


def _int_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            return None
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return sym_div(a, b)


def _sym_equal(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return int(a == b)
    if a == b:
        return 1
    # A dim is never negative: comparing one with a negative constant is decided.
    if isinstance(a, int) and a < 0 or isinstance(b, int) and b < 0:
        return 0
    return None


def _sym_compare(cmp):
    def f(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return int(cmp(a, b))
        return None
    return f


def _binary(name, ref, sym_fn=None, out_dtype=None):
    def infer(inputs):
        return elementwise(name, inputs, out_dtype)

    sym = (lambda inputs: _sym_broadcast(sym_fn, inputs)) if sym_fn else None
    register(name, ("a", "b"), infer=infer, sym=sym)(ref)


def _int_aware_div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        q = np.abs(a) // np.abs(b)
        return np.where((a >= 0) == (b >= 0), q, -q).astype(a.dtype)
    return np.divide(a, b)


_binary("add", np.add, operator.add)
_binary("sub", np.subtract, operator.sub)
_binary("mul", np.multiply, operator.mul)
_binary("div", _int_aware_div, _int_div)
_binary("max", np.maximum, dim_max)
_binary("min", np.minimum, dim_min)
_binary("equal", np.equal, _sym_equal, DType.bool)
_binary("less", np.less, _sym_compare(operator.lt), DType.bool)
_binary("less_equal", np.less_equal, _sym_compare(operator.le), DType.bool)
_binary("greater", np.greater, _sym_compare(operator.gt), DType.bool)
_binary("greater_equal", np.greater_equal, _sym_compare(operator.ge), DType.bool)
_binary("and", np.logical_and, _sym_compare(lambda a, b: bool(a) and bool(b)))
_binary("or", np.logical_or, _sym_compare(lambda a, b: bool(a) or bool(b)))


def _pow_infer(inputs):
    base, exp = inputs
    return elementwise("pow", inputs, base.dtype)


@register("pow", ("base", "exponent"), infer=_pow_infer)
def pow_(base, exponent):
    """base ** exponent; the exponent may have another dtype, the result has the base's."""
    return np.power(base, exponent.astype(base.dtype)).astype(base.dtype)


# Unary ops -----------------------------------------------------------------------------------

_erf = np.frompyfunc(math.erf, 1, 1)


def erf(x):
    return _erf(x.astype(np.float64)).astype(x.dtype)


def sigmoid(x):
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(x.dtype)


_UNARY = {
    "neg": (np.negative, operator.neg),
    "abs": (np.abs, None),
    "exp": (np.exp, None),
    "log": (np.log, None),
    "sqrt": (np.sqrt, None),
    "reciprocal": (np.reciprocal, None),
    "tanh": (np.tanh, None),
    "sigmoid": (sigmoid, None),
    "erf": (erf, None),
    "sin": (np.sin, None),
    "cos": (np.cos, None),
    "floor": (np.floor, None),
    "ceil": (np.ceil, None),
    "relu": (lambda x: np.maximum(x, np.zeros((), x.dtype)), None),
    "not": (np.logical_not, None),
}


def _same_type(inputs, **_):
    return [inputs[0].type]


def _register_unary(name, ref, sym_fn):
    sym = (lambda inputs: _sym_broadcast(sym_fn, inputs)) if sym_fn else None
    register(name, ("x",), infer=_same_type, sym=sym)(ref)


for _name, (_ref, _sym) in _UNARY.items():
    _register_unary(_name, _ref, _sym)


def _bool_type(inputs, **_):
    return [inputs[0].type.with_dtype(DType.bool)]


register("is_nan", ("x",), infer=_bool_type)(np.isnan)
register("is_inf", ("x",), infer=_bool_type)(np.isinf)


@register("gelu", ("x",), {"approximate": "none"}, infer=_same_type)
def gelu(x, approximate):
    """GELU, exact (erf) or with the tanh approximation."""
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        return (0.5 * x * (1 + np.tanh(inner))).astype(x.dtype)
    return (0.5 * x * (1 + erf(x / np.asarray(math.sqrt(2), x.dtype)))).astype(x.dtype)


def _where_infer(inputs):
    cond, x, y = inputs
    return [TensorType(broadcast_shapes(cond.shape, x.shape, y.shape), same_dtype("where", [x, y]))]


def _where_sym(inputs):
    return _sym_broadcast(lambda c, x, y: None if not isinstance(c, int) else (x if c else y),
                          inputs)


@register("where", ("cond", "x", "y"), infer=_where_infer, sym=_where_sym)
def where(cond, x, y):
    return np.where(cond, x, y)


def _cast_infer(inputs, to):
    return [inputs[0].type.with_dtype(to)]


def _cast_sym(inputs, to):
    s = sym_of(inputs[0])
    if s is None:
        return None
    if to is DType.bool:
        return _sym_broadcast(lambda d: int(d != 0) if isinstance(d, int) else None, inputs)
    # Exporters cast shape values to float and back; the values are whole numbers throughout.
    return s if all(is_dim(d) for d in (s if isinstance(s, tuple) else (s,))) else None


@register("cast", ("x",), {"to": None}, infer=_cast_infer, sym=_cast_sym)
def cast(x, to):
    return x.astype(to.numpy())


@register("identity", ("x",), infer=_same_type, sym=lambda inputs: sym_of(inputs[0]))
def identity(x):
    """A copy; gives a graph output its own name when it aliases another value."""
    return x.copy()
