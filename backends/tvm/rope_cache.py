"""`rope_cache` as a TVM kernel, writing into the runtime-owned KV cache in place.

    qkv      [batch, seq, row_width]                  the merged projection, as the GEMM wrote it;
                                                       q, k, v are (heads + 2 kv_heads) * d columns
                                                       from `offset` (Phi's row also holds fc1)
    cos, sin [batch or 1, seq, rotary_dim]             the rotary tables of this step's positions
                                                       (with rotation only; one sequence's serve all)
    qn, kn   [d] or [heads*d], [d] or [kv_heads*d]    the q/k norms' weights (with `qk_norm` only)
    k_cache, v_cache [batch, kv_heads, max_seq, d]     owned by the runtime; rows past..past+seq are
                                                       written, nothing else is touched (in the
                                                       spec's `order`: [batch, max_seq, kv_heads, d]
                                                       for "bshd")
    q        [batch, heads, seq, d]                    out: the queries, rotated

With `qk_norm`, q and k are first RMS-normalized (in float32), each head on its own ("head") or
the whole projection ("all"). The first `rotary_dim` features of each q and k head rotate
(rotate_half form), the rest pass through; v is copied. This is the cache contract of the runtime: one preallocated buffer per
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
    qk_norm: str = ""  # "", "head" or "all" (`ops.transformer.rope_cache`)
    norm_epsilon: float = 0.0

    @staticmethod
    def of(node) -> "RopeCacheSpec":
        rd = node.attrs["rotary_dim"]
        d = node.outputs[0].shape[3]
        rotary = len(node.inputs) > 3 and node.inputs[3] is not None
        return RopeCacheSpec(node.attrs["heads"], node.attrs["kv_heads"], d, (rd or d) if rotary else 0,
                             node.outputs[0].dtype.numpy().name, qk_norm=node.attrs["qk_norm"],
                             norm_epsilon=node.attrs["norm_epsilon"])

    def norm_width(self, heads: int) -> int:
        """The features one q/k norm spans: a head's, or the projection's of `heads` heads."""
        return self.head_dim * (heads if self.qk_norm == "all" else 1)

    def norm_groups(self, heads: int) -> int:
        """The norms one token's q (or k) takes: one per head, or one for them all."""
        return heads if self.qk_norm == "head" else 1


def quantize_rows(x):
    """The int8 cache's encoding of rows x [..., d] (numpy): (int8 values, f32 scales [...])."""
    import numpy as np

    scale = np.maximum(np.abs(x).max(axis=-1), TINY) / 127
    return np.rint(x / scale[..., None]).astype(np.int8), scale.astype(np.float32)


TINY = 1e-30  # the scale of an all-zero row stays positive


def _rotation(spec: RopeCacheSpec):
    """(projection row width, rotary tables' width, rotated): rotated(read, vb, vs, vh, vd, cos,
    sin) is feature vd of head vh, rotated, where read(vb, vs, vh, f) reads feature f of head vh
    of a token's q or k (`_readers`)."""
    from tvm.script import tirx as T

    rd = max(spec.rotary_dim, 2)  # the tables' width (unused when there is no rotation)
    half = rd // 2

    def rotated(read, vb, vs, vh, vd, cos, sin):
        if spec.rotary_dim == 0:
            return read(vb, vs, vh, vd)
        partner = T.if_then_else(vd < half, -read(vb, vs, vh, vd + half), read(vb, vs, vh, vd - half))
        tb = T.min(vb, cos.shape[0] - 1)  # tables of one sequence's positions serve every sequence
        return T.if_then_else(vd < rd, read(vb, vs, vh, vd) * cos[tb, vs, vd] + partner * sin[tb, vs, vd],
                              read(vb, vs, vh, vd))
    return spec.row_width or (spec.heads + 2 * spec.kv_heads) * spec.head_dim, rd, rotated


def _readers(spec: RopeCacheSpec, qkv, qn, kn, qss, kss):
    """(read_q, read_k): read(vb, vs, vh, f) is feature f of head vh of token vs of sequence vb,
    normalized with `qk_norm` (qss, kss: the sums of squares `_norm_sums` wrote)."""
    from tvm.script import tirx as T

    d, dt, off = spec.head_dim, spec.dtype, spec.offset
    eps = T.float32(spec.norm_epsilon)

    def reader(first_head, heads, weight, sums):
        width, per_head = spec.norm_width(heads), spec.qk_norm == "head"

        def read(vb, vs, vh, f):
            x = qkv[vb, vs, off + (first_head + vh) * d + f]
            if not spec.qk_norm:
                return x
            rstd = T.float32(1) / T.sqrt(sums[vb, vs, vh if per_head else 0] / T.float32(width) + eps)
            return T.Cast(dt, T.Cast("float32", x) * rstd) * weight[f if per_head else vh * d + f]
        return read
    return reader(0, spec.heads, qn, qss), reader(spec.heads, spec.kv_heads, kn, kss)


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
    normed = bool(spec.qk_norm)
    qnw, knw = spec.norm_width(hq), spec.norm_width(hkv)
    sums_shape = (lambda heads: (b, s, spec.norm_groups(heads)) if normed else (0,))
    cache_dt = "int8" if spec.kv_int8 else dt
    caches = kv_shape(order, n, hkv, page, d) if page else kv_shape(order, b, hkv, m, d)
    scales = kv_shape(order, n, hkv, page) if page else kv_shape(order, b, hkv, m)
    contiguous, paged = _slots(spec)
    norm_sums, write_q, write_kv, write_int8 = _bodies(spec)
    write_caches = write_int8 if spec.kv_int8 else write_kv

    def slot(past, blocks, lengths):
        return paged(blocks, lengths) if page else contiguous(past)

    @T.prim_func(s_tir=True)
    def main(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, qn_h: T.handle, kn_h: T.handle, kc_h: T.handle,
             vc_h: T.handle, ks_h: T.handle, vs_h: T.handle, blocks_h: T.handle, lengths_h: T.handle, q_h: T.handle,
             past: T.int64):
        T.func_attr({"tirx.noalias": True})
        qkv = T.match_buffer(qkv_h, (b, s, width), dt)
        cos = T.match_buffer(cos_h, (bt, s, rd), dt)
        sin = T.match_buffer(sin_h, (bt, s, rd), dt)
        qn = T.match_buffer(qn_h, (qnw,), dt)
        kn = T.match_buffer(kn_h, (knw,), dt)
        kc = T.match_buffer(kc_h, caches, cache_dt)
        vc = T.match_buffer(vc_h, caches, cache_dt)
        ks = T.match_buffer(ks_h, scales, dt)
        vsc = T.match_buffer(vs_h, scales, dt)
        blocks = T.match_buffer(blocks_h, (b, mb), "int32")
        lengths = T.match_buffer(lengths_h, (b,), "int32")
        q = T.match_buffer(q_h, (b, hq, s, d), dt)
        where = T.meta_var(slot(past, blocks, lengths))
        qss = T.sblock_alloc_buffer(sums_shape(hq), "float32")  # empty without norms
        kss = T.sblock_alloc_buffer(sums_shape(hkv), "float32")
        if normed:
            norm_sums(qkv, qss, kss)
        read_q, read_k = T.meta_var(_readers(spec, qkv, qn, kn, qss, kss))
        write_q(read_q, cos, sin, q)
        write_caches(read_k, qkv, cos, sin, kc, vc, ks, vsc, where)

    taken = [True, bool(spec.rotary_dim), bool(spec.rotary_dim), normed, normed, True, True, spec.kv_int8,
             spec.kv_int8, bool(page), bool(page), True, not page]
    return tirx.PrimFunc([p for p, t in zip(main.params, taken) if t], main.body, main.ret_type, main.attrs)


def args_and_views(node, args: tuple[str, ...]) -> tuple[tuple[str, ...], tuple]:
    """The step's arguments as the kernel takes them (`cache_layout.rope_cache_args`' less the
    tables and norms a kernel without rotation or norms has no parameters for) and their views:
    the rotary tables [batch, 1, seq, d] as [batch, seq, d]."""
    args = tuple(a for a in args if a)  # "" only for the tables and norms a kernel lacks
    tables = {v.name: v for v in node.inputs[3:5] if v is not None}
    return args, tuple((t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])
                       if t is not None and len(t.shape) != 3 else None for t in map(tables.get, args))


def build(spec: RopeCacheSpec, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func(spec)}), target=tvm.target.Target(target))


def _bodies(spec: RopeCacheSpec):
    """The kernel's loops as TVMScript macros over the buffers its signature declares (qkv, cos,
    sin, q, the caches kc/vc, an int8 cache's scales ks/vsc), the readers of q and k
    (`_readers`) and `where`, a token's cache slot: (norm_sums: the q/k norms' sums of squares,
    write_q, write_kv: f32 caches, write_int8: quantized per head and token as written)."""
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    _, _, rotated = _rotation(spec)
    off, order = spec.offset, spec.order
    qg, kg, qnw, knw = spec.norm_groups(hq), spec.norm_groups(hkv), spec.norm_width(hq), spec.norm_width(hkv)

    @T.macro
    def norm_sums(qkv, qss, kss):
        for bi, si, gi, fi in T.grid(qkv.shape[0], qkv.shape[1], qg, qnw):
            with T.sblock("q_sums"):
                vb, vs, vg, vf = T.axis.remap("SSSR", [bi, si, gi, fi])
                with T.init():
                    qss[vb, vs, vg] = T.float32(0)
                qss[vb, vs, vg] = qss[vb, vs, vg] + T.Cast("float32", qkv[vb, vs, off + vg * qnw + vf]) * \
                    T.Cast("float32", qkv[vb, vs, off + vg * qnw + vf])
        for bi, si, gi, fi in T.grid(qkv.shape[0], qkv.shape[1], kg, knw):
            with T.sblock("k_sums"):
                vb, vs, vg, vf = T.axis.remap("SSSR", [bi, si, gi, fi])
                with T.init():
                    kss[vb, vs, vg] = T.float32(0)
                kss[vb, vs, vg] = kss[vb, vs, vg] + T.Cast("float32", qkv[vb, vs, off + hq * d + vg * knw + vf]) * \
                    T.Cast("float32", qkv[vb, vs, off + hq * d + vg * knw + vf])

    @T.macro
    def write_q(read_q, cos, sin, q):
        for bi, hi, si, di in T.grid(q.shape[0], hq, q.shape[2], d):
            with T.sblock("q"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                q[vb, vh, vs, vd] = rotated(read_q, vb, vs, vh, vd, cos, sin)

    @T.macro
    def write_kv(read_k, qkv, cos, sin, kc, vc, ks, vsc, where):  # f32 caches: no scales (ks, vsc unread)
        for bi, hi, si, di in T.grid(qkv.shape[0], hkv, qkv.shape[1], d):
            with T.sblock("kv"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                row, pos = T.meta_var(where(vb, vs))
                T.buffer_store(kc, rotated(read_k, vb, vs, vh, vd, cos, sin),
                               kv_index(order, row, vh, pos, vd))
                T.buffer_store(vc, qkv[vb, vs, off + (hq + hkv + vh) * d + vd], kv_index(order, row, vh, pos, vd))

    @T.macro
    def write_int8(read_k, qkv, cos, sin, kc, vc, ks, vsc, where):
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
                                          T.fabs(rotated(read_k, vb, vsi, vh, vd, cos, sin)))
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
                    rotated(read_k, vb, vsi, vh, vd, cos, sin) * T.float32(127) / kmax[vb, vh, vsi])),
                    kv_index(order, row, vh, pos, vd))
                T.buffer_store(vc, T.Cast("int8", T.round(
                    qkv[vb, vsi, off + (hq + hkv + vh) * d + vd] * T.float32(127) / vmax[vb, vh, vsi])),
                    kv_index(order, row, vh, pos, vd))

    return norm_sums, write_q, write_kv, write_int8
