"""ONNX op name -> converter function: the whole ONNX frontend's op knowledge, one entry per op.

A converter is named after the ONNX op it converts. It receives the conversion context, the
node's inputs (IR Values, None for omitted optional inputs) and the node's attributes as keyword
arguments with the ONNX defaults, and returns the node's outputs. Opset differences (attributes
that became inputs) are handled inside the converter of the op concerned.

A missing op is a one-function change here; `llmc ops` and docs/onnx-ops.md list these keys.
"""

from __future__ import annotations

import math

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


# onnxruntime's contrib ops, as onnxruntime-genai's model builder emits them ---------------------
@converter("SimplifiedLayerNormalization")
def SimplifiedLayerNormalization(ctx, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """`rms_norm` (onnxruntime's name for it; the inverse-RMS output is not supported)"""
    if ctx.num_outputs > 1:
        ctx.fail("the inverse-RMS output is not supported")
    return ctx.emit("rms_norm", [x, scale], axis=axis, epsilon=epsilon)


def _skip_norm(norm):
    def convert(ctx, x, skip, gamma, beta=None, bias=None, *, epsilon=1e-5):
        # outputs: the norm, mean, inverse std (not supported), and the sum x + skip (+ bias)
        if any(ctx.node.output[i] for i in (1, 2) if i < len(ctx.node.output)):
            ctx.fail("the mean and inverse-std outputs are not supported")
        if norm == "rms_norm" and bias is None:  # SkipSimplified has no beta: its 4th input is the bias
            beta, bias = None, beta
        total = ctx.emit("add", [x, skip])
        if bias is not None:
            total = ctx.emit("add", [total, bias])
        inputs = [total, gamma] + ([beta] if norm == "layer_norm" else [])
        y = ctx.emit(norm, inputs, axis=-1, epsilon=epsilon)
        return [y, None, None, total]
    convert.__doc__ = f"`{norm}` of the residual sum, which is the 4th output; recognized as `add_norm`"
    return convert


CONVERTERS["com.microsoft.SkipSimplifiedLayerNormalization"] = _skip_norm("rms_norm")
CONVERTERS["com.microsoft.SkipLayerNormalization"] = _skip_norm("layer_norm")


@converter("com.microsoft.GroupQueryAttention")
def GroupQueryAttention(ctx, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                        total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
                        attention_bias=None, head_sink=None, *, num_heads, kv_num_heads, scale=None,
                        local_window_size=-1, do_rotary=0, rotary_interleaved=0, softcap=0.0,
                        smooth_softmax=0, qk_output=0):
    """Packed QKV [batch, seq, (heads + 2 kv_heads) * head_dim] split into heads, rotated with the
    cos/sin tables at the positions after the cache, appended to the cache, causal attention
    (within `local_window_size` when set: a mask): the ops every other export spells out, so
    the same fusions apply. The positions are rebuilt
    from the cache length (`seqlens_k` and `total_sequence_length` say the same for sequences
    without padding, which is how the runtimes run them)."""
    if key is not None or value is not None:
        ctx.fail("separate key and value inputs are not supported (only packed QKV)")
    if attention_bias is not None or head_sink is not None or softcap or smooth_softmax or qk_output:
        ctx.fail("attention_bias, head_sink, softcap, smooth_softmax and qk_output are not supported")
    if rotary_interleaved:
        ctx.fail("interleaved rotary is not supported")
    width = query.shape[-1]
    if not isinstance(width, int) or width % (num_heads + 2 * kv_num_heads):
        ctx.fail(f"the packed QKV width {width} is not (num_heads + 2 kv_num_heads) * head_dim")
    d = width // (num_heads + 2 * kv_num_heads)
    batch, seq = query.shape[:2]
    q, k, v = ctx.emit_multi("split", [query], axis=-1, sizes=(num_heads * d, kv_num_heads * d, kv_num_heads * d),
                             num_outputs=3)
    q, k, v = (_split_heads(ctx, t, n) for t, n in ((q, num_heads), (k, kv_num_heads), (v, kv_num_heads)))
    past = past_key.shape[2] if past_key is not None else 0
    if do_rotary:
        if cos_cache is None or sin_cache is None:
            ctx.fail("do_rotary without cos_cache and sin_cache")
        if position_ids is None:  # [batch, seq]: past .. past + seq - 1
            row = ctx.emit("unsqueeze", [_arange(ctx, past, past + seq)], axes=(0,))
            position_ids = ctx.emit("expand", [row, ctx.emit("dims", [], values=(batch, seq))])
        half = cos_cache.shape[-1]
        tables = [ctx.emit("unsqueeze", [ctx.emit("gather", [ctx.emit("concat", [t, t], axis=-1), position_ids],
                                                  axis=0)], axes=(1,)) for t in (cos_cache, sin_cache)]
        rotary_dim = 2 * half if 2 * half != d else 0
        q, k = (ctx.emit("rotary", [t, *tables], rotary_dim=rotary_dim) for t in (q, k))
    if past_key is not None:
        k = ctx.emit("concat", [past_key, k], axis=2)
        v = ctx.emit("concat", [past_value, v], axis=2)
    window = [_window_mask(ctx, past, batch, seq, local_window_size)] if local_window_size > 0 else []
    y = ctx.emit("attention", [q, k, v, *window], scale=float(scale or 1 / np.sqrt(d)), is_causal=int(not window))
    y = ctx.emit("transpose", [y], perm=(0, 2, 1, 3))
    y = ctx.emit("reshape", [y, ctx.const_value(np.array([0, 0, -1], np.int64))])
    return [y, k, v]


def _window_mask(ctx, past, batch, seq, window):
    """The additive mask [batch, 1, seq, past + seq] of causal attention over the last `window`
    positions (the query's own included, as onnxruntime counts), for queries at past .. past +
    seq - 1."""
    queries = ctx.emit("unsqueeze", [_arange(ctx, past, past + seq)], axes=(1,))
    keys = ctx.emit("unsqueeze", [_arange(ctx, 0, past + seq)], axes=(0,))
    first = ctx.emit("sub", [queries, ctx.const_value(np.array(window, np.int64))])
    seen = ctx.emit("and", [ctx.emit("less_equal", [keys, queries]), ctx.emit("greater", [keys, first])])
    mask = ctx.emit("where", [seen, ctx.const_value(np.array(0, np.float32)),
                              ctx.const_value(np.array(-np.inf, np.float32))])
    return ctx.emit("expand", [ctx.emit("unsqueeze", [mask], axes=(0, 1)),
                               ctx.emit("dims", [], values=(batch, 1, seq, past + seq))])


def _arange(ctx, start, stop):
    """int64 start .. stop - 1, the bounds dims known at run time (past, past + seq)."""
    def scalar(d):
        return ctx.emit("squeeze", [ctx.emit("dims", [], values=(d,))], axes=None)
    return ctx.emit("range", [scalar(start), scalar(stop), ctx.const_value(np.array(1, np.int64))])


@converter("com.microsoft.MatMulNBits")
def MatMulNBits(ctx, a, b, scales, zero_points=None, g_idx=None, bias=None, *, K, N, bits=4, block_size,
                accuracy_level=0):
    """A GEMM over block-wise 4-bit weights, taken into llmc's w4 format as they are (no
    re-quantization): B [N, blocks, block_size / 2] holds two values a byte, low nibble first;
    scales [N * blocks]; zero points packed likewise, or 8 when absent."""
    w, s = ctx.graph.const_value(b), ctx.graph.const_value(scales)
    if bits != 4 or g_idx is not None:
        ctx.fail(f"{bits}-bit weights and g_idx are not supported (4-bit, in order)")
    if w is None or s is None or (zero_points is not None and ctx.graph.const_value(zero_points) is None):
        ctx.fail("the weights, scales and zero points must be constants")
    # llmc's groups must divide K; ORT pads K to whole blocks. Groups of gcd(K, block_size)
    # share their block's scale and zero: the same weights, exactly.
    group = math.gcd(K, block_size)
    if group % 2:
        ctx.fail(f"K {K} is odd: 4-bit weights pack two input features a byte")
    blocks = -(-K // block_size)
    q = _nibbles(w.reshape(N, -1))[:, :K]
    if zero_points is None:
        zero = np.full((N, blocks), 8, np.float32)
    else:
        z = ctx.graph.const_value(zero_points)
        zero = (_nibbles(z.reshape(N, -1))[:, :blocks] if z.dtype == np.uint8 else z.reshape(N, blocks)).astype(np.float32)
    scale = s.reshape(N, blocks).astype(np.float32)
    scale, zero = (np.repeat(t, block_size // group, axis=1)[:, :K // group] for t in (scale, zero))
    name = ctx.node.input[1]
    return ctx.emit("fused_linear", [a, ctx.const_value(q, f"{name}.q4"), bias, None, None, None,
                                     ctx.const_value(np.ascontiguousarray(scale), f"{name}.scale"),
                                     ctx.const_value(np.ascontiguousarray(zero), f"{name}.zero")],
                    quant="w4", group_size=group)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [rows, n] -> [rows, 2n]: low nibble first."""
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 15, packed >> 4
    return out
