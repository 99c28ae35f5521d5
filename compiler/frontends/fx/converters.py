"""ATen op -> converter function: the FX frontend's op knowledge, one entry per ATen op.

Keys are `namespace.name` of the op's overload packet (`aten.add` covers `add.Tensor` and
`add.Scalar`). A converter receives the conversion context, the node's arguments (IR Values for
tensors, ints or symbolic dims for sizes, Python scalars) and its keyword arguments, and returns
the node's result (a Value, or a tuple for ops with several results). Scalars become constants
of the dtype torch computes in. Shapes that torch has already worked out (view, expand) are taken
from the node's metadata rather than recomputed.

`SYM_OPS` are the size computations of a dynamic graph (`sym_size`, + - * // on sizes): they run
here, on symbolic dims, and produce no IR.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ...ir.dtypes import DType
from ...ir.graph import Value

CONVERTERS = {}


def op_key(target) -> str:
    """`aten.add` for torch.ops.aten.add.Tensor; `_operator.add` for operator.add."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return f"{target.namespace}.{packet.__name__}"
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', target)}"


def converter(*names):
    def wrap(fn):
        for name in names or (f"aten.{fn.__name__}",):
            CONVERTERS[name] = fn
        return fn
    return wrap


SYM_OPS = {
    "aten.sym_size": lambda x, dim: x.shape[dim],
    "_operator.add": operator.add, "_operator.sub": operator.sub, "_operator.mul": operator.mul,
    "_operator.floordiv": operator.floordiv, "_operator.neg": operator.neg,
}


# Operands -------------------------------------------------------------------------------------
def _operand(ctx, x, dtype: DType) -> Value:
    """A tensor operand in `dtype`: Python scalars become constants, tensors are cast."""
    if isinstance(x, Value):
        return x if x.dtype == dtype else ctx.emit("cast", [x], to=dtype)
    if not isinstance(x, (bool, int, float)):
        x = ctx.scalar_dim(x)  # a symbolic size used as a number
        return x if x.dtype == dtype else ctx.emit("cast", [x], to=dtype)
    return ctx.const(np.array(x, dtype.numpy()))


def _compute_dtype(args) -> DType:
    """The dtype torch compares in: that of the tensors, float if any operand is a float."""
    tensors = [a.dtype for a in args if isinstance(a, Value)]
    if any(t.is_float for t in tensors):
        return next(t for t in tensors if t.is_float)
    if any(isinstance(a, float) for a in args):
        return DType.f32
    return tensors[0] if tensors else DType.i64


def _arith(ir_op):
    def convert(ctx, a, b, *, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            ctx.fail(f"rounding_mode={rounding_mode!r} is not supported")
        dtype = ctx.out_type.dtype
        if alpha != 1:
            b = ctx.emit("mul", [_operand(ctx, b, dtype), _operand(ctx, alpha, dtype)])
        return ctx.emit(ir_op, [_operand(ctx, a, dtype), _operand(ctx, b, dtype)])
    return convert


def _compare(ir_op, negate=False):
    def convert(ctx, a, b):
        dtype = _compute_dtype([a, b])
        y = ctx.emit(ir_op, [_operand(ctx, a, dtype), _operand(ctx, b, dtype)])
        return ctx.emit("not", [y]) if negate else y
    return convert


def _logical(ir_op):
    def convert(ctx, *xs):
        if any(x.dtype != DType.bool for x in xs):
            ctx.fail("bitwise ops are supported on bool tensors only")
        return ctx.emit(ir_op, list(xs))
    return convert


def _unary(ir_op):
    def convert(ctx, x):
        return ctx.emit(ir_op, [_operand(ctx, x, ctx.out_type.dtype)])
    return convert


for _name, _ir in {"add": "add", "sub": "sub", "mul": "mul", "div": "div"}.items():
    CONVERTERS[f"aten.{_name}"] = _arith(_ir)
for _name, _ir in {"eq": "equal", "lt": "less", "le": "less_equal", "gt": "greater",
                   "ge": "greater_equal"}.items():
    CONVERTERS[f"aten.{_name}"] = _compare(_ir)
CONVERTERS["aten.ne"] = _compare("equal", negate=True)
for _name, _ir in {"bitwise_and": "and", "logical_and": "and", "bitwise_or": "or",
                   "logical_or": "or", "bitwise_not": "not", "logical_not": "not"}.items():
    CONVERTERS[f"aten.{_name}"] = _logical(_ir)
for _name in ("neg", "exp", "log", "sqrt", "tanh", "sigmoid", "erf", "cos", "sin", "abs",
              "reciprocal", "relu", "silu"):
    CONVERTERS[f"aten.{_name}"] = _unary(_name)


@converter()
def rsqrt(ctx, x):
    return ctx.emit("reciprocal", [ctx.emit("sqrt", [x])])


@converter()
def gelu(ctx, x, *, approximate="none"):
    return ctx.emit("gelu", [x], approximate=approximate)


@converter()
def pow(ctx, x, exponent):  # noqa: A001
    dtype = ctx.out_type.dtype
    return ctx.emit("pow", [_operand(ctx, x, dtype), _operand(ctx, exponent, dtype)])


@converter()
def where(ctx, cond, x, y):
    dtype = ctx.out_type.dtype
    return ctx.emit("where", [cond, _operand(ctx, x, dtype), _operand(ctx, y, dtype)])


@converter()
def masked_fill(ctx, x, mask, value):
    return ctx.emit("where", [mask, _operand(ctx, value, x.dtype), x])


# Creation -------------------------------------------------------------------------------------
def _filled(ctx, size, value):
    t = ctx.out_type
    if t.is_static:
        return ctx.const(np.full(t.shape, value, t.dtype.numpy()))
    return ctx.emit("constant_of_shape", [ctx.dims(t.shape)], value=np.array([value], t.dtype.numpy()))


def _creation(value=None):
    """full / ones / zeros and their new_* and *_like forms: the size comes from the metadata."""
    def convert(ctx, *args, dtype=None, layout=None, device=None, pin_memory=None,
                memory_format=None, requires_grad=None):
        fill = args[-1] if value is None else value
        return _filled(ctx, None, fill)
    return convert


for _name in ("full", "new_full", "full_like"):
    CONVERTERS[f"aten.{_name}"] = _creation()
for _name, _v in {"ones": 1, "new_ones": 1, "ones_like": 1, "zeros": 0, "new_zeros": 0,
                  "zeros_like": 0, "new_empty": 0, "empty": 0}.items():
    CONVERTERS[f"aten.{_name}"] = _creation(_v)


@converter()
def scalar_tensor(ctx, s, *, dtype=None, layout=None, device=None, pin_memory=None):
    return ctx.const(np.array(s, ctx.out_type.dtype.numpy()))


@converter()
def arange(ctx, *args, dtype=None, layout=None, device=None, pin_memory=None):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    out = ctx.out_type.dtype
    if out.is_float or not all(isinstance(x, int) for x in (start, step)):
        if not all(isinstance(x, (int, float)) for x in (start, end, step)):
            ctx.fail("a float or symbolic-step range of symbolic length")
        return ctx.const(np.arange(start, end, step, out.numpy()))
    y = ctx.emit("range", [ctx.scalar_dim(start), ctx.scalar_dim(end), ctx.scalar_dim(step)])
    return y if out == DType.i64 else ctx.emit("cast", [y], to=out)


def _nothing(ctx, *args, **kwargs):
    """Checks torch.export keeps in the graph; they compute nothing."""
    return None


for _name in ("_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
              "sym_constrain_range"):
    CONVERTERS[f"aten.{_name}"] = _nothing


# Views and data movement ----------------------------------------------------------------------
def _same(ctx, x, *args, **kwargs):
    """Value semantics: a copy, an alias or a contiguous version is the value itself."""
    return x


for _name in ("clone", "alias", "contiguous", "detach", "lift_fresh_copy"):
    CONVERTERS[f"aten.{_name}"] = _same


@converter("aten._to_copy", "aten.to", "prims.convert_element_type")
def to_copy(ctx, x, *args, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
            memory_format=None, copy=False):
    out = ctx.out_type.dtype
    return x if x.dtype == out else ctx.emit("cast", [x], to=out)


@converter("aten.view", "aten._unsafe_view", "aten.reshape")
def view(ctx, x, size):
    return ctx.emit("reshape", [x, ctx.dims(ctx.out_type.shape)])


@converter()
def expand(ctx, x, size, *, implicit=False):
    return ctx.emit("expand", [x, ctx.dims(ctx.out_type.shape)])


@converter()
def t(ctx, x):
    return x if x.type.rank < 2 else ctx.emit("transpose", [x], perm=(1, 0))


@converter()
def transpose(ctx, x, dim0, dim1):
    perm = list(range(x.type.rank))
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return ctx.emit("transpose", [x], perm=tuple(perm))


@converter()
def permute(ctx, x, dims):
    return ctx.emit("transpose", [x], perm=tuple(d % x.type.rank for d in dims))


@converter()
def unsqueeze(ctx, x, dim):
    return ctx.emit("unsqueeze", [x], axes=(dim,))


@converter()
def squeeze(ctx, x, dim=None):
    dims = range(x.type.rank) if dim is None else [dim] if isinstance(dim, int) else dim
    axes = tuple(d % x.type.rank for d in dims if x.shape[d] == 1)
    return ctx.emit("squeeze", [x], axes=axes) if axes else x


@converter("aten.slice")
def slice_(ctx, x, dim=0, start=None, end=None, step=1):
    size = x.shape[dim]
    start = 0 if start is None else start
    if end is None or (isinstance(end, int) and isinstance(size, int) and end > size):
        end = size
    if isinstance(end, int) and end >= 2 ** 62:  # "to the end" of a symbolic dim
        end = size
    return ctx.emit("slice", [x, ctx.dims([start]), ctx.dims([end]), ctx.dims([dim]), ctx.dims([step])])


@converter()
def select(ctx, x, dim, index):
    return ctx.emit("gather", [x, ctx.scalar_dim(index)], axis=dim)


@converter()
def cat(ctx, tensors, dim=0):
    # torch skips 1-D empty tensors whatever `dim` is (a DynamicCache starts with such keys)
    tensors = [x for x in tensors if x.shape != (0,)]
    return tensors[0] if len(tensors) == 1 else ctx.emit("concat", tensors, axis=dim)


@converter()
def index_copy(ctx, x, dim, index, source):
    """A static KV cache's write (transformers' StaticCache: the new keys or values at the cache
    positions, along the sequence axis of [batch, kv_heads, max_len, head_dim])."""
    if x.type.rank != 4 or dim not in (2, -2):
        ctx.fail(f"index_copy along dim {dim} of a rank-{x.type.rank} tensor: only a KV cache's sequence axis "
                 "(dim 2 of 4) is supported")
    return ctx.emit("kv_write", [x, index, source])


@converter("aten.split", "aten.split_with_sizes")
def split(ctx, x, sizes, dim=0):
    if isinstance(sizes, int):
        total = x.shape[dim]
        if not isinstance(total, int):
            ctx.fail("split of a symbolic dim into equal chunks")
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    return tuple(ctx.emit_multi("split", [x], axis=dim, sizes=tuple(sizes), num_outputs=len(sizes)))


@converter()
def embedding(ctx, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return ctx.emit("gather", [weight, indices], axis=0)


@converter()
def triu(ctx, x, diagonal=0):
    return ctx.emit("trilu", [x, ctx.const(np.array(diagonal, np.int64))], upper=1)


@converter()
def tril(ctx, x, diagonal=0):
    return ctx.emit("trilu", [x, ctx.const(np.array(diagonal, np.int64))], upper=0)


@converter()
def cumsum(ctx, x, dim, *, dtype=None):
    x = _operand(ctx, x, ctx.out_type.dtype)
    return ctx.emit("cumsum", [x, ctx.const(np.array(dim, np.int64))])


# Compute --------------------------------------------------------------------------------------
@converter("aten.mm", "aten.bmm", "aten.matmul")
def mm(ctx, a, b):
    return ctx.emit("matmul", [a, b])


@converter()
def addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        ctx.fail("addmm with alpha or beta other than 1")
    return ctx.emit("add", [ctx.emit("matmul", [a, b]), bias])


@converter()
def linear(ctx, x, w, bias=None):
    y = ctx.emit("matmul", [x, ctx.emit("transpose", [w], perm=(1, 0))])
    return y if bias is None else ctx.emit("add", [y, bias])


def _reduce(ir_op):
    def convert(ctx, x, dim=None, keepdim=False, *, dtype=None):
        axes = None if dim is None else tuple([dim] if isinstance(dim, int) else dim)
        y = ctx.emit(ir_op, [x], axes=axes, keepdims=int(keepdim))
        return _operand(ctx, y, ctx.out_type.dtype)
    return convert


for _name, _ir in {"mean": "reduce_mean", "sum": "reduce_sum", "amax": "reduce_max",
                   "amin": "reduce_min"}.items():
    CONVERTERS[f"aten.{_name}"] = _reduce(_ir)


def _boolean_reduce(ir_op):
    """any / all of a bool tensor: the max / min of it as 0s and 1s."""
    def convert(ctx, x, dim=None, keepdim=False):
        axes = None if dim is None else tuple([dim] if isinstance(dim, int) else dim)
        y = ctx.emit(ir_op, [_operand(ctx, x, DType.f32)], axes=axes, keepdims=int(keepdim))
        return ctx.emit("greater", [y, _operand(ctx, 0.0, DType.f32)])
    return convert


CONVERTERS["aten.any"] = _boolean_reduce("reduce_max")
CONVERTERS["aten.all"] = _boolean_reduce("reduce_min")


@converter("aten._softmax", "aten.softmax")
def softmax(ctx, x, dim, half_to_float=None, *, dtype=None):
    return _operand(ctx, ctx.emit("softmax", [x], axis=dim), ctx.out_type.dtype)


@converter("aten._log_softmax", "aten.log_softmax")
def log_softmax(ctx, x, dim, half_to_float=None, *, dtype=None):
    return _operand(ctx, ctx.emit("log_softmax", [x], axis=dim), ctx.out_type.dtype)


@converter("aten.native_layer_norm", "aten.layer_norm")
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=None):
    if len(normalized_shape) != 1 or weight is None:
        ctx.fail("layer norm over more than the last axis, or without a weight")
    y = ctx.emit("layer_norm", [x, weight, bias], axis=-1, epsilon=float(eps))
    # native_layer_norm also returns the mean and 1/std (for the backward pass): not computed
    return (y, None, None) if ctx.op_name.startswith("native") else y


@converter("aten.rms_norm", "aten._fused_rms_norm")
def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1 or weight is None:
        ctx.fail("RMS norm over more than the last axis, or without a weight")
    eps = float(np.finfo(x.dtype.numpy()).eps) if eps is None else float(eps)
    y = ctx.emit("rms_norm", [x, weight], axis=-1, epsilon=eps)
    return (y, None) if ctx.op_name.startswith("_fused") else y


@converter("aten._scaled_dot_product_flash_attention_for_cpu", "aten.scaled_dot_product_attention",
           "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention")
def scaled_dot_product_attention(ctx, q, k, v, *args, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, attn_bias=None, return_debug_mask=False,
                                 compute_log_sumexp=False):
    name = ctx.op_name
    # positional spellings: sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa);
    # efficient(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal); the flash ones
    # (q, k, v, dropout_p, is_causal)
    if name.startswith("scaled_dot"):
        attn_mask, dropout_p, is_causal, scale = (list(args) + [attn_mask, dropout_p, is_causal, scale][len(args):])[:4]
    elif name.startswith("_scaled_dot_product_efficient"):
        attn_mask, _, dropout_p, is_causal = (list(args) + [attn_bias, False, dropout_p, is_causal][len(args):])[:4]
    else:
        dropout_p, is_causal = (list(args) + [dropout_p, is_causal][len(args):])[:2]
    if dropout_p:
        ctx.fail("attention with dropout (training)")
    if is_causal and q.shape[2] != k.shape[2]:
        # torch aligns a causal mask at the first key, the IR op at the last: equal only then
        ctx.fail("is_causal with queries and keys of (possibly) different lengths")
    if attn_mask is not None and attn_mask.dtype == DType.bool:  # additive, as the kernels take it
        attn_mask = ctx.emit("where", [attn_mask, _operand(ctx, 0.0, q.dtype), _operand(ctx, -math.inf, q.dtype)])
    y = ctx.emit("attention", [q, k, v, attn_mask], scale=scale, is_causal=int(bool(is_causal)))
    if name == "scaled_dot_product_attention":
        return y
    return (y,) + (None,) * 8  # the log-sum-exp and the other by-products are not computed


@converter()
def index(ctx, x, indices):
    """x[i0, i1, ...] with index tensors on the leading axes: the indices broadcast together,
    stacked along a new last axis, then `gather_nd`."""
    if not indices or any(i is None for i in indices):
        ctx.fail("indexing with slices between the index tensors")
    k = len(indices)
    lead = ctx.out_type.shape[:ctx.out_type.rank - (x.type.rank - k)]
    target = ctx.dims(lead)
    parts = [ctx.emit("unsqueeze", [ctx.emit("expand", [_operand(ctx, i, DType.i64), target])], axes=(-1,))
             for i in indices]
    return ctx.emit("gather_nd", [x, ctx.emit("concat", parts, axis=-1)])
