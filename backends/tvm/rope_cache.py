"""`rope_cache` as a TVM kernel, writing into the runtime-owned KV cache in place.

    qkv      [batch, seq, row_width]                  the merged projection, as the GEMM wrote it;
                                                       q, k, v are (heads + 2 kv_heads) * d columns
                                                       from `offset` (Phi's row also holds fc1)
    cos, sin [batch, seq, rotary_dim]                  the rotary tables of this step's positions
    k_cache, v_cache [batch, kv_heads, max_seq, d]     owned by the runtime; rows past..past+seq are
                                                       written, nothing else is touched (in the
                                                       spec's `order`: [batch, max_seq, kv_heads, d]
                                                       for "bshd")
    q        [batch, heads, seq, d]                    out: the queries, rotated

The first `rotary_dim` features of each q and k head rotate (rotate_half form), the rest pass
through; v is copied. This is the cache contract of the runtime: one preallocated buffer per
layer and kind, written at the current length, read by attention up to past + seq.

With `kv_int8` the caches hold int8 and two more arguments, k_scale and v_scale
[batch, kv_heads, max_seq] (in the cache's order), one scale per head and token: a row x is written as
round(x / s) with s = max|x| / 127 (`quantize_rows`), and attention multiplies back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import kv_index, kv_shape


@dataclass(frozen=True)
class RopeCacheSpec:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # 0: no rotation (GPT-2, OPT)
    dtype: str = "float32"
    row_width: int = 0  # 0: exactly q, k and v
    offset: int = 0
    kv_int8: bool = False
    order: str = "bhsd"  # the caches' axis order (`plan.KV_ORDERS`)

    @staticmethod
    def of(node) -> "RopeCacheSpec":
        rd = node.attrs["rotary_dim"]
        d = node.outputs[0].shape[3]
        rotary = len(node.inputs) > 3 and node.inputs[3] is not None
        return RopeCacheSpec(node.attrs["heads"], node.attrs["kv_heads"], d, (rd or d) if rotary else 0,
                             node.outputs[0].dtype.numpy().name)


def quantize_rows(x):
    """The int8 cache's encoding of rows x [..., d] (numpy): (int8 values, f32 scales [...])."""
    import numpy as np

    scale = np.maximum(np.abs(x).max(axis=-1), TINY) / 127
    return np.rint(x / scale[..., None]).astype(np.int8), scale.astype(np.float32)


TINY = 1e-30  # the scale of an all-zero row stays positive


def _rotation(spec: RopeCacheSpec):
    """(projection row width, rotary tables' width, rotated): rotated(x, vb, vs, base, vd, cos,
    sin) is feature vd of the head starting at column `base` of a projection row, rotated."""
    from tvm.script import tirx as T

    rd = max(spec.rotary_dim, 2)  # the tables' width (unused when there is no rotation)
    half = rd // 2

    def rotated(x, vb, vs, base, vd, cos, sin):
        if spec.rotary_dim == 0:
            return x[vb, vs, base + vd]
        partner = T.if_then_else(vd < half, -x[vb, vs, base + vd + half], x[vb, vs, base + vd - half])
        return T.if_then_else(vd < rd, x[vb, vs, base + vd] * cos[vb, vs, vd] + partner * sin[vb, vs, vd],
                              x[vb, vs, base + vd])
    return spec.row_width or (spec.heads + 2 * spec.kv_heads) * spec.head_dim, rd, rotated


def prim_func(spec: RopeCacheSpec):
    if spec.kv_int8:
        return _prim_func_int8(spec)
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    width, rd, rotated = _rotation(spec)
    off = spec.offset

    @T.prim_func(s_tir=True)
    def main(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, kc_h: T.handle, vc_h: T.handle,
             q_h: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        m = T.int64()
        qkv = T.match_buffer(qkv_h, (b, s, width), dt)
        cos = T.match_buffer(cos_h, (b, s, rd), dt)
        sin = T.match_buffer(sin_h, (b, s, rd), dt)
        kc = T.match_buffer(kc_h, kv_shape(spec.order, b, hkv, m, d), dt)
        vc = T.match_buffer(vc_h, kv_shape(spec.order, b, hkv, m, d), dt)
        q = T.match_buffer(q_h, (b, hq, s, d), dt)
        for bi, hi, si, di in T.grid(b, hq, s, d):
            with T.sblock("q"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                q[vb, vh, vs, vd] = rotated(qkv, vb, vs, off + vh * d, vd, cos, sin)
        for bi, hi, si, di in T.grid(b, hkv, s, d):
            with T.sblock("kv"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                T.buffer_store(kc, rotated(qkv, vb, vs, off + (hq + vh) * d, vd, cos, sin),
                               kv_index(spec.order, vb, vh, past + vs, vd))
                T.buffer_store(vc, qkv[vb, vs, off + (hq + hkv + vh) * d + vd], kv_index(spec.order, vb, vh, past + vs, vd))

    return main


def build(spec: RopeCacheSpec, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func(spec)}), target=tvm.target.Target(target))


def _prim_func_int8(spec: RopeCacheSpec):
    """As `prim_func`, the keys and values quantized per head and token as they are written."""
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    width, rd, rotated = _rotation(spec)
    off = spec.offset

    @T.prim_func(s_tir=True)
    def main(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, kc_h: T.handle, vc_h: T.handle,
             ks_h: T.handle, vs_h: T.handle, q_h: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        m = T.int64()
        qkv = T.match_buffer(qkv_h, (b, s, width), dt)
        cos = T.match_buffer(cos_h, (b, s, rd), dt)
        sin = T.match_buffer(sin_h, (b, s, rd), dt)
        kc = T.match_buffer(kc_h, kv_shape(spec.order, b, hkv, m, d), "int8")
        vc = T.match_buffer(vc_h, kv_shape(spec.order, b, hkv, m, d), "int8")
        ks = T.match_buffer(ks_h, kv_shape(spec.order, b, hkv, m), dt)
        vsc = T.match_buffer(vs_h, kv_shape(spec.order, b, hkv, m), dt)
        q = T.match_buffer(q_h, (b, hq, s, d), dt)
        kmax = T.sblock_alloc_buffer((b, hkv, s), dt)
        vmax = T.sblock_alloc_buffer((b, hkv, s), dt)
        for bi, hi, si, di in T.grid(b, hq, s, d):
            with T.sblock("q"):
                vb, vh, vsi, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                q[vb, vh, vsi, vd] = rotated(qkv, vb, vsi, off + vh * d, vd, cos, sin)
        for bi, hi, si, di in T.grid(b, hkv, s, d):
            with T.sblock("max"):
                vb, vh, vsi, vd = T.axis.remap("SSSR", [bi, hi, si, di])
                with T.init():
                    kmax[vb, vh, vsi] = T.float32(TINY)
                    vmax[vb, vh, vsi] = T.float32(TINY)
                kmax[vb, vh, vsi] = T.max(kmax[vb, vh, vsi],
                                          T.fabs(rotated(qkv, vb, vsi, off + (hq + vh) * d, vd, cos, sin)))
                vmax[vb, vh, vsi] = T.max(vmax[vb, vh, vsi], T.fabs(qkv[vb, vsi, off + (hq + hkv + vh) * d + vd]))
        for bi, hi, si in T.grid(b, hkv, s):
            with T.sblock("scales"):
                vb, vh, vsi = T.axis.remap("SSS", [bi, hi, si])
                T.buffer_store(ks, kmax[vb, vh, vsi] / T.float32(127), kv_index(spec.order, vb, vh, past + vsi))
                T.buffer_store(vsc, vmax[vb, vh, vsi] / T.float32(127), kv_index(spec.order, vb, vh, past + vsi))
        for bi, hi, si, di in T.grid(b, hkv, s, d):
            with T.sblock("kv"):
                vb, vh, vsi, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                T.buffer_store(kc, T.Cast("int8", T.round(
                    rotated(qkv, vb, vsi, off + (hq + vh) * d, vd, cos, sin) * T.float32(127) / kmax[vb, vh, vsi])),
                    kv_index(spec.order, vb, vh, past + vsi, vd))
                T.buffer_store(vc, T.Cast("int8", T.round(
                    qkv[vb, vsi, off + (hq + hkv + vh) * d + vd] * T.float32(127) / vmax[vb, vh, vsi])),
                    kv_index(spec.order, vb, vh, past + vsi, vd))

    return main
