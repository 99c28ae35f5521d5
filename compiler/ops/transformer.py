"""Ops that passes produce: folded shape values, linear layers, recognized activations, rotary
embeddings and the fused kernels. Each is defined by its numpy reference, like every other op."""

from __future__ import annotations

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import TensorType
from .elementwise import sigmoid
from .infer import same_dtype
from .nn import _f32, layer_norm, rms_norm
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
def _rotary_infer(inputs, rotary_dim):
    return [inputs[0].type]


@register("rotary", ("x", "cos", "sin"), {"rotary_dim": 0}, infer=_rotary_infer)
def rotary(x, cos, sin, rotary_dim=0):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2]):
    the rotary embedding as Llama, NeoX and Phi write it. With `rotary_dim` only the first
    rotary_dim features rotate (partial rotary, NeoX and Phi) and the rest pass through."""
    if rotary_dim and rotary_dim < x.shape[-1]:
        head = rotary(x[..., :rotary_dim], cos, sin)
        return np.concatenate([head, x[..., rotary_dim:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


# KV cache -------------------------------------------------------------------------------------
def _kv_append_infer(inputs):
    past, new = inputs
    same_dtype("kv_append", [past, new])
    return [past.type.with_shape(past.shape[:2] + (past.shape[2] + new.shape[2],) + past.shape[3:])]


@register("kv_append", ("past", "new"), infer=_kv_append_infer)
def kv_append(past, new):
    """The cache after writing `new` behind `past`, both [batch, kv_heads, seq, head_dim]. The
    runtime owns the cache and writes in place; as a value it is the concatenation."""
    return np.concatenate([past, new], axis=2)


def _kv_write_infer(inputs):
    cache, positions, new = inputs
    same_dtype("kv_write", [cache, new])
    return [cache.type]


@register("kv_write", ("cache", "positions", "new"), infer=_kv_write_infer)
def kv_write(cache, positions, new):
    """A static cache [batch, kv_heads, max_len, head_dim] with `new` [batch, kv_heads, seq,
    head_dim] written at `positions` [seq] (torch's `index_copy` along the sequence, as
    transformers' StaticCache does it). The caller owns the cache; the kernels write in place."""
    out = cache.copy()
    out[:, :, np.asarray(positions)] = new
    return out


def _split_heads(x, heads):
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1)


QK_NORMS = ("", "head", "all")


def _rope_cache_infer(inputs, heads, kv_heads, rotary_dim, qk_norm, norm_epsilon):
    q, k, v, cos, sin, past_k, past_v, positions, q_norm, k_norm = (list(inputs) + [None] * 10)[:10]
    same_dtype("rope_cache", [q, k, v])
    if qk_norm not in QK_NORMS or (q_norm is None) != (qk_norm == ""):
        raise ValueError(f"rope_cache: qk_norm {qk_norm!r} with{'out' * (q_norm is None)} norm weights")
    b, s = q.shape[:2]

    def heads_of(x, n, past):
        d = x.shape[2] // n if isinstance(x.shape[2], int) else None
        length = s if past is None else past.shape[2] if positions is not None else past.shape[2] + s
        return x.type.with_shape((b, n, length, d))
    return [heads_of(q, heads, None), heads_of(k, kv_heads, past_k), heads_of(v, kv_heads, past_v)]


@register("rope_cache", ("q", "k", "v", "cos?", "sin?", "past_k?", "past_v?", "positions?", "q_norm?", "k_norm?"),
          {"heads": REQUIRED, "kv_heads": REQUIRED, "rotary_dim": 0, "qk_norm": "", "norm_epsilon": 0.0},
          infer=_rope_cache_infer)
def rope_cache(q, k, v, cos=None, sin=None, past_k=None, past_v=None, positions=None, q_norm=None, k_norm=None,
               heads=1, kv_heads=1, rotary_dim=0, qk_norm="", norm_epsilon=0.0):
    """Split the projections [batch, seq, heads*head_dim] into heads, apply the rotary embedding
    to q and k (when cos/sin are given), and write k and v behind the cached past. Returns q
    [batch, heads, seq, head_dim] and the caches [batch, kv_heads, past+seq, head_dim]; with
    `positions`, the caches are static ([batch, kv_heads, max_len, head_dim]) and k and v are
    written at those positions (`kv_write`).
    With `qk_norm`, q and k are RMS-normalized before the rotation, by the weights q_norm and
    k_norm: "head", each head on its own (Qwen3, Gemma 3: weights [head_dim]); "all", the whole
    projection (OLMo 2: weights [heads*head_dim] and [kv_heads*head_dim])."""
    if qk_norm == "all":
        q, k = rms_norm(q, q_norm, epsilon=norm_epsilon), rms_norm(k, k_norm, epsilon=norm_epsilon)
    q, k, v = _split_heads(q, heads), _split_heads(k, kv_heads), _split_heads(v, kv_heads)
    if qk_norm == "head":
        q, k = rms_norm(q, q_norm, epsilon=norm_epsilon), rms_norm(k, k_norm, epsilon=norm_epsilon)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if cos is not None:
        q, k = rotary(q, cos, sin, rotary_dim), rotary(k, cos, sin, rotary_dim)
    if positions is not None:
        k, v = kv_write(past_k, positions, k), kv_write(past_v, positions, v)
    elif past_k is not None:
        k, v = kv_append(past_k, k), kv_append(past_v, v)
    return np.require(q, requirements="C"), k, v


# fused linear ---------------------------------------------------------------------------------
_ACTIVATIONS = {
    "": lambda y: y,
    "relu": lambda y: np.maximum(y, 0),
    "silu": lambda y: y * sigmoid(y),
}


def _activate(y, activation):
    if activation.startswith("gelu"):
        from .elementwise import gelu

        return gelu(y, "tanh" if activation == "gelu_tanh" else "none")
    return _ACTIVATIONS[activation](y)


QUANT_SCHEMES = ("w8", "w4")


def dequantize(q, scale, zero, quant: str, group_size: int) -> np.ndarray:
    """The f32 weight [n, k] a weight-quantized GEMM computes with.
    w8: q int8 [n, k], scale [n] (per output channel): q * scale.
    w4: q uint8 [n, k] holding 0..15, scale and zero f32 [n, k / group_size] (groups of
    consecutive input features): (q - zero) * scale; symmetric schemes have zero 8."""
    q = q.astype(np.float32)
    if quant == "w8":
        return q * scale[:, None]
    return (q - np.repeat(zero, group_size, axis=1)) * np.repeat(scale, group_size, axis=1)


def quantize_activations(x, block: int) -> np.ndarray:
    """x [..., k] f32 as int8 in blocks of `block` consecutive features, dequantized: per block,
    round(x * 127 / max|x|) / (127 / max|x|) (zeros stay zeros). What a GEMM with `act_block`
    multiplies: the kernels take the int8 values and the blocks' scales to integer dot products."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv)
    scale = amax * np.float32(1 / 127)
    return (q * scale).reshape(x.shape).astype(np.float32)


def _fused_linear_infer(inputs, norm, epsilon, activation, gated, quant, group_size, act_block):
    x, w = inputs[:2]
    if quant:
        scale, zero = (list(inputs) + [None] * 8)[6:8]
        if quant not in QUANT_SCHEMES:
            raise ValueError(f"fused_linear: unknown quantization {quant!r}")
        if scale is None or (quant == "w4" and (zero is None or w.shape[1] % group_size)):
            raise ValueError(f"fused_linear: {quant} weights need their scales (and zeros, whole groups)")
    if act_block and (not quant or w.shape[1] % act_block or (quant == "w4" and group_size % act_block)):
        raise ValueError(f"fused_linear: int8 activations in blocks of {act_block} need quantized weights "
                         "and whole blocks in every weight group")
    if not quant and not (w.dtype.numpy().name == "float16" and x.dtype.numpy().name == "float32"):
        same_dtype("fused_linear", [x, w])  # f16 weights may serve f32 activations (passes/half_weights)
    n = w.shape[0] // 2 if gated else w.shape[0]
    return [x.type.with_shape(x.shape[:-1] + (n,))]


@register("fused_linear", ("x", "w", "bias?", "residual?", "norm_scale?", "norm_bias?", "w_scale?", "w_zero?"),
          {"norm": "", "epsilon": 1e-5, "activation": "", "gated": 0, "quant": "", "group_size": 0, "act_block": 0},
          infer=_fused_linear_infer)
def fused_linear(x, w, bias=None, residual=None, norm_scale=None, norm_bias=None, w_scale=None, w_zero=None,
                 norm="", epsilon=1e-5, activation="", gated=0, quant="", group_size=0, act_block=0):
    """One GEMM with its prologue and epilogue:
    h = norm(x) (rms or layer, when `norm`); y = h @ w.T + bias;
    y = act(y[..., :n]) * y[..., n:] when `gated` (SwiGLU/GeGLU, gate and up concatenated),
    else act(y); y = y + residual.
    With `quant`, w is quantized and `dequantize(w, w_scale, w_zero, quant, group_size)` is the
    weight. With `act_block` too, h is quantized to int8 in blocks of that many features
    (`quantize_activations`) before the product: the kernels multiply integers."""
    if quant:
        w = dequantize(w, w_scale, w_zero, quant, group_size)
    if norm == "rms":
        x = rms_norm(x, norm_scale, epsilon=epsilon)
    elif norm == "layer":
        x = layer_norm(x, norm_scale, norm_bias, epsilon=epsilon)
    if act_block:
        x = quantize_activations(x, act_block)
    y = linear(x, w, bias).astype(np.float32)
    if gated:
        gate, up = np.split(y, 2, axis=-1)
        y = _activate(gate, activation) * up
    else:
        y = _activate(y, activation)
    if residual is not None:
        y = y + _f32(residual)
    return y.astype(x.dtype)


def _add_norm_infer(inputs, norm, epsilon):
    a, b = inputs[:2]
    same_dtype("add_norm", [a, b])
    from .infer import broadcast_shapes

    t = a.type.with_shape(broadcast_shapes(a.shape, b.shape))
    return [t, t]


@register("add_norm", ("a", "b", "scale", "bias?"), {"norm": REQUIRED, "epsilon": 1e-5},
          infer=_add_norm_infer)
def add_norm(a, b, scale, bias=None, norm="rms", epsilon=1e-5):
    """The residual sum and its normalization: (a + b, norm(a + b))."""
    s = a + b
    return s, _normalized(s, scale, bias, norm, epsilon)


def _normalized(x, scale, bias, norm, epsilon):
    return rms_norm(x, scale, epsilon=epsilon) if norm == "rms" else layer_norm(x, scale, bias, epsilon=epsilon)


def _norm_add_infer(inputs, norm, epsilon):
    residual, x = inputs[:2]
    same_dtype("norm_add", [residual, x])
    if residual.shape != x.shape:
        raise ValueError(f"norm_add: residual {residual.type} and normalized {x.type} differ")
    return [x.type]


@register("norm_add", ("residual", "x", "scale", "bias?"), {"norm": REQUIRED, "epsilon": 1e-5},
          infer=_norm_add_infer)
def norm_add(residual, x, scale, bias=None, norm="rms", epsilon=1e-5):
    """A post-norm residual step (OLMo 2, Gemma 2/3): residual + norm(x)."""
    return (residual + _normalized(x, scale, bias, norm, epsilon)).astype(x.dtype)
