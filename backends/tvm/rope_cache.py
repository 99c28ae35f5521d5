"""`rope_cache` as a TVM kernel, writing into the runtime-owned KV cache in place.

    qkv      [batch, seq, row_width]                  the merged projection, as the GEMM wrote it;
                                                       q, k, v are (heads + 2 kv_heads) * d columns
                                                       from `offset` (Phi's row also holds fc1)
    cos, sin [batch or 1, seq, rotary_dim]             the rotary tables of this step's positions
                                                       (with rotation only; one sequence's serve all)
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

import math
from dataclasses import dataclass

from ..cache_layout import kv_index, kv_shape, kv_slot


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
    page_tokens: int = 0  # a paged cache's block size (`cache_layout.lay_out_caches`); 0: contiguous

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
        tb = T.min(vb, cos.shape[0] - 1)  # tables of one sequence's positions serve every sequence
        return T.if_then_else(vd < rd, x[vb, vs, base + vd] * cos[tb, vs, vd] + partner * sin[tb, vs, vd],
                              x[vb, vs, base + vd])
    return spec.row_width or (spec.heads + 2 * spec.kv_heads) * spec.head_dim, rd, rotated


def _slots(spec: RopeCacheSpec):
    """(contiguous, paged): where a step's token vs of sequence vb is written, as [cache row,
    position in it]; a contiguous cache's from the step's `past`, a paged one's from the
    sequence's own length and block table (`cache_layout.kv_slot`)."""
    def contiguous(past):
        return lambda vb, vs: kv_slot(0, None, vb, past + vs)

    def paged(blocks, lengths):
        return lambda vb, vs: kv_slot(spec.page_tokens, blocks, vb, lengths[vb].astype("int64") + vs)
    return contiguous, paged


def prim_func(spec: RopeCacheSpec):
    """The kernel. Its parameters, in order: qkv, the rotary tables cos and sin (with rotation
    only), the caches kc and vc, an int8 cache's scales ks and vs, a paged cache's block tables
    and lengths, q out, then a contiguous cache's `past`. One TVMScript function declares every
    parameter; those this spec does not read are dropped from the signature."""
    from tvm import tirx
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    width, rd, _ = _rotation(spec)
    order, page = spec.order, spec.page_tokens
    b, bt, s, n, m, mb = (tirx.Var(x, "int64") for x in ("b", "bt", "s", "n", "m", "mb"))
    cache_dt = "int8" if spec.kv_int8 else dt
    caches = kv_shape(order, n, hkv, page, d) if page else kv_shape(order, b, hkv, m, d)
    scales = kv_shape(order, n, hkv, page) if page else kv_shape(order, b, hkv, m)
    contiguous, paged = _slots(spec)
    write_q, write_kv, write_int8 = _bodies(spec)
    write_caches = write_int8 if spec.kv_int8 else write_kv

    def slot(past, blocks, lengths):
        return paged(blocks, lengths) if page else contiguous(past)

    @T.prim_func(s_tir=True)
    def main(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, kc_h: T.handle, vc_h: T.handle, ks_h: T.handle,
             vs_h: T.handle, blocks_h: T.handle, lengths_h: T.handle, q_h: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True})
        qkv = T.match_buffer(qkv_h, (b, s, width), dt)
        cos = T.match_buffer(cos_h, (bt, s, rd), dt)
        sin = T.match_buffer(sin_h, (bt, s, rd), dt)
        kc = T.match_buffer(kc_h, caches, cache_dt)
        vc = T.match_buffer(vc_h, caches, cache_dt)
        ks = T.match_buffer(ks_h, scales, dt)
        vsc = T.match_buffer(vs_h, scales, dt)
        blocks = T.match_buffer(blocks_h, (b, mb), "int32")
        lengths = T.match_buffer(lengths_h, (b,), "int32")
        q = T.match_buffer(q_h, (b, hq, s, d), dt)
        where = T.meta_var(slot(past, blocks, lengths))
        write_q(qkv, cos, sin, q)
        write_caches(qkv, cos, sin, kc, vc, ks, vsc, where)

    taken = [True, bool(spec.rotary_dim), bool(spec.rotary_dim), True, True, spec.kv_int8, spec.kv_int8,
             bool(page), bool(page), True, not page]
    return tirx.PrimFunc([p for p, t in zip(main.params, taken) if t], main.body, main.ret_type, main.attrs)


def args_and_views(node, args: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    """The step's arguments as the kernel takes them (`cache_layout.rope_cache_args`' less the
    tables a kernel without rotation has no parameters for) and their views: the rotary tables
    [batch, 1, seq, d] as [batch, seq, d]."""
    args = tuple(a for a in args if a)  # "" only for the tables of a rope without rotation
    tables = {v.name: v for v in node.inputs[3:5] if v is not None}
    return args, tuple((t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])
                       if t is not None and len(t.shape) != 3 else None for t in map(tables.get, args))


def build(spec: RopeCacheSpec, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func(spec)}), target=tvm.target.Target(target))


def _bodies(spec: RopeCacheSpec):
    """The kernel's loops as TVMScript macros over the buffers its signature declares (qkv, cos,
    sin, q, the caches kc/vc, an int8 cache's scales ks/vsc) and `where`, a token's cache slot:
    (write_q, write_kv: f32 caches, write_int8: quantized per head and token as written)."""
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    _, _, rotated = _rotation(spec)
    off, order = spec.offset, spec.order

    @T.macro
    def write_q(qkv, cos, sin, q):
        for bi, hi, si, di in T.grid(q.shape[0], hq, q.shape[2], d):
            with T.sblock("q"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                q[vb, vh, vs, vd] = rotated(qkv, vb, vs, off + vh * d, vd, cos, sin)

    @T.macro
    def write_kv(qkv, cos, sin, kc, vc, ks, vsc, where):  # f32 caches: no scales (ks, vsc unread)
        for bi, hi, si, di in T.grid(qkv.shape[0], hkv, qkv.shape[1], d):
            with T.sblock("kv"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                row, pos = T.meta_var(where(vb, vs))
                T.buffer_store(kc, rotated(qkv, vb, vs, off + (hq + vh) * d, vd, cos, sin),
                               kv_index(order, row, vh, pos, vd))
                T.buffer_store(vc, qkv[vb, vs, off + (hq + hkv + vh) * d + vd], kv_index(order, row, vh, pos, vd))

    @T.macro
    def write_int8(qkv, cos, sin, kc, vc, ks, vsc, where):
        b, s = T.meta_var(qkv.shape[:2])
        kmax = T.sblock_alloc_buffer((b, hkv, s), dt)
        vmax = T.sblock_alloc_buffer((b, hkv, s), dt)
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
                row, pos = T.meta_var(where(vb, vsi))
                T.buffer_store(ks, kmax[vb, vh, vsi] / T.float32(127), kv_index(order, row, vh, pos))
                T.buffer_store(vsc, vmax[vb, vh, vsi] / T.float32(127), kv_index(order, row, vh, pos))
        for bi, hi, si, di in T.grid(b, hkv, s, d):
            with T.sblock("kv"):
                vb, vh, vsi, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                row, pos = T.meta_var(where(vb, vsi))
                T.buffer_store(kc, T.Cast("int8", T.round(
                    rotated(qkv, vb, vsi, off + (hq + vh) * d, vd, cos, sin) * T.float32(127) / kmax[vb, vh, vsi])),
                    kv_index(order, row, vh, pos, vd))
                T.buffer_store(vc, T.Cast("int8", T.round(
                    qkv[vb, vsi, off + (hq + hkv + vh) * d + vd] * T.float32(127) / vmax[vb, vh, vsi])),
                    kv_index(order, row, vh, pos, vd))

    return write_q, write_kv, write_int8
