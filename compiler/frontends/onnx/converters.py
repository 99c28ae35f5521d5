"""ONNX op name -> converter function: the whole ONNX frontend's op knowledge, one entry per op.

A converter is named after the ONNX op it converts. It receives the conversion context, the
node's inputs (IR Values, None for omitted optional inputs) and the node's attributes as keyword
arguments with the ONNX defaults, and returns the node's outputs. Opset differences (attributes
that became inputs) are handled inside the converter of the op concerned.

A missing op is a one-function change here; `llmc ops` and docs/onnx-ops.md list these keys.
"""

from __future__ import annotations

import numpy as np

CONVERTERS = {}


def converter(*names):
    def wrap(fn):
        for name in names or (fn.__name__,):
            CONVERTERS[name] = fn
        return fn
    return wrap


# Elementwise ----------------------------------------------------------------------------------
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "equal",
    "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
    "GreaterOrEqual": "greater_equal", "And": "and", "Or": "or",
}
_UNARY = {
    "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt",
    "Reciprocal": "reciprocal", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Sin": "sin",
    "Cos": "cos", "Floor": "floor", "Ceil": "ceil", "Relu": "relu", "Not": "not",
    "IsNaN": "is_nan",
}


def _direct(ir_op):
    def convert(ctx, *inputs):
        return ctx.emit(ir_op, inputs)
    convert.__doc__ = f"`{ir_op}`"
    return convert


for _onnx, _ir in {**_BINARY, **_UNARY}.items():
    CONVERTERS[_onnx] = _direct(_ir)


def _variadic(ir_op):
    def convert(ctx, *inputs):
        out = inputs[0]
        for x in inputs[1:]:
            out = ctx.emit(ir_op, [out, x])
        return out
    convert.__doc__ = f"a chain of binary `{ir_op}`"
    return convert


CONVERTERS["Max"] = _variadic("max")
CONVERTERS["Min"] = _variadic("min")
CONVERTERS["Sum"] = _variadic("add")


@converter()
def IsInf(ctx, x, *, detect_negative=1, detect_positive=1):
    """`is_inf` (both signs only)"""
    if not (detect_negative and detect_positive):
        ctx.fail("only detect_negative=1, detect_positive=1 is supported")
    return ctx.emit("is_inf", [x])


@converter()
def Gelu(ctx, x, *, approximate="none"):
    """`gelu` (exact or tanh approximation)"""
    return ctx.emit("gelu", [x], approximate=approximate)


@converter()
def Clip(ctx, x, lo=None, hi=None):
    """`max` / `min` with the bounds"""
    if lo is not None:
        x = ctx.emit("max", [x, lo])
    if hi is not None:
        x = ctx.emit("min", [x, hi])
    return x


@converter()
def Where(ctx, cond, x, y):
    """`where`"""
    return ctx.emit("where", [cond, x, y])


@converter()
def Cast(ctx, x, *, to, saturate=1, round_mode="up"):
    """`cast` (nothing when the type already matches)"""
    dtype = ctx.dtype(to)
    return x if dtype == x.dtype else ctx.emit("cast", [x], to=dtype)


@converter()
def CastLike(ctx, x, like, *, saturate=1, round_mode="up"):
    """`cast` to the other input's type"""
    return x if like.dtype == x.dtype else ctx.emit("cast", [x], to=like.dtype)


@converter("Identity", "Dropout")
def Identity(ctx, x, *_ignored, seed=None, ratio=None, training_mode=None):
    """nothing: the output is the input (Dropout: at inference)"""
    # Dropout is the identity at inference; its optional mask output is rejected by the context.
    return x


# Constants ------------------------------------------------------------------------------------
@converter()
def Constant(ctx, *, value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, value_string=None, value_strings=None, sparse_value=None):
    """a parameter (numeric tensor, float(s), int(s))"""
    name = ctx.node.output[0]
    if value is not None:
        return ctx.const_value(value, name)
    for data, dtype in ((value_float, np.float32), (value_floats, np.float32),
                        (value_int, np.int64), (value_ints, np.int64)):
        if data is not None:
            return ctx.const_value(np.array(data, dtype), name)
    ctx.fail("only numeric tensor constants are supported")


@converter()
def ConstantOfShape(ctx, shape, *, value=None):
    """`constant_of_shape`"""
    value = np.zeros(1, np.float32) if value is None else value
    return ctx.emit("constant_of_shape", [shape], value=value)


# Shapes ---------------------------------------------------------------------------------------
@converter()
def Shape(ctx, x, *, start=0, end=None):
    """`shape` (start/end)"""
    return ctx.emit("shape", [x], start=start, end=end)


@converter()
def Reshape(ctx, x, shape, *, allowzero=0):
    """`reshape` (0 copies a dim unless allowzero; one -1 is inferred)"""
    return ctx.emit("reshape", [x, shape], allowzero=allowzero)


@converter()
def Transpose(ctx, x, *, perm=None):
    """`transpose`"""
    return ctx.emit("transpose", [x], perm=tuple(perm) if perm is not None else None)


@converter()
def Squeeze(ctx, x, axes=None, *, axes_attr=None):
    """`squeeze`; axes as attribute (opset < 13) or constant input"""
    axes = ctx.const_ints(axes) if axes is not None else axes_attr
    return ctx.emit("squeeze", [x], axes=tuple(axes) if axes is not None else None)


@converter()
def Unsqueeze(ctx, x, axes=None, *, axes_attr=None):
    """`unsqueeze`; axes as attribute (opset < 13) or constant input"""
    axes = ctx.const_ints(axes) if axes is not None else axes_attr
    return ctx.emit("unsqueeze", [x], axes=tuple(axes))


@converter()
def Flatten(ctx, x, *, axis=1):
    """`flatten`"""
    return ctx.emit("flatten", [x], axis=axis)


@converter()
def Concat(ctx, *xs, axis):
    """`concat`"""
    return ctx.emit("concat", list(xs), axis=axis)


@converter()
def Split(ctx, x, split=None, *, axis=0, split_attr=None, num_outputs=None):
    """`split` by sizes (attribute or constant input) or into num_outputs pieces"""
    sizes = ctx.const_ints(split) if split is not None else split_attr
    n = len(sizes) if sizes is not None else (num_outputs or ctx.num_outputs)
    return ctx.emit_multi("split", [x], axis=axis, num_outputs=n,
                          sizes=tuple(sizes) if sizes is not None else None)


@converter()
def Slice(ctx, x, starts, ends, axes=None, steps=None):
    """`slice`, always with all four of starts/ends/axes/steps as inputs"""
    n = starts.shape[0]
    if axes is None:
        axes = ctx.const_value(np.arange(n, dtype=np.int64))
    if steps is None:
        steps = ctx.const_value(np.ones(n, np.int64))
    return ctx.emit("slice", [x, starts, ends, axes, steps])


@converter()
def Gather(ctx, x, indices, *, axis=0):
    """`gather`"""
    return ctx.emit("gather", [x, indices], axis=axis)


@converter()
def GatherND(ctx, x, indices, *, batch_dims=0):
    """`gather_nd` (with batch_dims)"""
    return ctx.emit("gather_nd", [x, indices], batch_dims=batch_dims)


@converter()
def Expand(ctx, x, shape):
    """`expand`"""
    return ctx.emit("expand", [x, shape])


@converter()
def Range(ctx, start, limit, delta):
    """`range`"""
    return ctx.emit("range", [start, limit, delta])


@converter()
def Trilu(ctx, x, k=None, *, upper=1):
    """`trilu`"""
    return ctx.emit("trilu", [x, k], upper=upper)


@converter()
def CumSum(ctx, x, axis, *, exclusive=0, reverse=0):
    """`cumsum` (exclusive, reverse)"""
    return ctx.emit("cumsum", [x, axis], exclusive=exclusive, reverse=reverse)


# Compute --------------------------------------------------------------------------------------
@converter()
def MatMul(ctx, a, b):
    """`matmul`"""
    return ctx.emit("matmul", [a, b])


@converter()
def Gemm(ctx, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    """`transpose` (transA/transB), `matmul`, `mul` (alpha/beta), `add`"""
    if transA:
        a = ctx.emit("transpose", [a], perm=(1, 0))
    if transB:
        b = ctx.emit("transpose", [b], perm=(1, 0))
    y = ctx.emit("matmul", [a, b])
    if alpha != 1.0:
        y = ctx.emit("mul", [y, ctx.scalar(alpha, y.dtype)])
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = ctx.emit("mul", [c, ctx.scalar(beta, c.dtype)])
        y = ctx.emit("add", [y, c])
    return y


@converter()
def Softmax(ctx, x, *, axis=-1):
    """`softmax` along one axis (opset >= 13 semantics)"""
    return ctx.emit("softmax", [x], axis=axis)


@converter()
def LogSoftmax(ctx, x, *, axis=-1):
    """`log_softmax`"""
    return ctx.emit("log_softmax", [x], axis=axis)


@converter()
def LayerNormalization(ctx, x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    """`layer_norm` (the Mean/InvStdDev outputs are not supported)"""
    return ctx.emit("layer_norm", [x, scale, bias], axis=axis, epsilon=epsilon)


@converter()
def RMSNormalization(ctx, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """`rms_norm`"""
    return ctx.emit("rms_norm", [x, scale], axis=axis, epsilon=epsilon)


def _reduce(ir_op):
    def convert(ctx, x, axes=None, *, axes_attr=None, keepdims=1, noop_with_empty_axes=0):
        axes = ctx.const_ints(axes) if axes is not None else axes_attr
        if not axes:
            if noop_with_empty_axes:
                return x
            axes = None
        return ctx.emit(ir_op, [x], axes=tuple(axes) if axes is not None else None,
                        keepdims=keepdims)
    convert.__doc__ = f"`{ir_op}`; axes as attribute (opset < 18) or constant input"
    return convert


for _onnx, _ir in {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum",
                   "ReduceMax": "reduce_max", "ReduceMin": "reduce_min"}.items():
    CONVERTERS[_onnx] = _reduce(_ir)


@converter()
def Attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None,
              nonpad_kv_seqlen=None, *, is_causal=0, kv_num_heads=None, q_num_heads=None,
              qk_matmul_output_mode=0, scale=None, softcap=0.0, softmax_precision=None):
    """ONNX Attention (opset 23): 4-D [batch, heads, seq, head_dim] or 3-D [batch, seq, hidden]
    inputs, an optional past appended along the sequence, bottom-right aligned causal mask."""
    if softcap or nonpad_kv_seqlen is not None or ctx.num_outputs > 3:
        ctx.fail("softcap, nonpad_kv_seqlen and the qk_matmul output are not supported")
    three_d = q.type.rank == 3
    if three_d:
        if not (q_num_heads and kv_num_heads):
            ctx.fail("3-D inputs need q_num_heads and kv_num_heads")
        q, k, v = (_split_heads(ctx, t, n) for t, n in
                   ((q, q_num_heads), (k, kv_num_heads), (v, kv_num_heads)))
    # ONNX aligns the causal mask at the past length: query i sees keys up to past + i. The IR
    # op aligns it at the end of the keys, the same thing when the new keys match the queries.
    if is_causal and k.shape[2] != q.shape[2]:
        ctx.fail("is_causal with new keys and queries of (possibly) different lengths")
    if past_key is not None:
        k = ctx.emit("concat", [past_key, k], axis=2)
        v = ctx.emit("concat", [past_value, v], axis=2)
    y = ctx.emit("attention", [q, k, v, attn_mask], scale=scale, is_causal=is_causal)
    if three_d:
        y = ctx.emit("transpose", [y], perm=(0, 2, 1, 3))
        y = ctx.emit("reshape", [y, ctx.const_value(np.array([0, 0, -1], np.int64))])
    return [y, k, v][:max(ctx.num_outputs, 1)]


def _split_heads(ctx, t, heads):
    t = ctx.emit("reshape", [t, ctx.const_value(np.array([0, 0, heads, -1], np.int64))])
    return ctx.emit("transpose", [t], perm=(0, 2, 1, 3))


# Attributes that ONNX moved to inputs in later opsets keep their old spelling under `*_attr`.
RENAMED_ATTRS = {("Squeeze", "axes"), ("Unsqueeze", "axes"), ("Split", "split"),
                 ("ReduceMean", "axes"), ("ReduceSum", "axes"), ("ReduceMax", "axes"),
                 ("ReduceMin", "axes")}
