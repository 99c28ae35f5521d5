"""`rope_cache` as a TVM kernel, writing into the runtime-owned KV cache in place.

    qkv      [batch, seq, row_width]                  the merged projection, as the GEMM wrote it;
                                                       q, k, v are (heads + 2 kv_heads) * d columns
                                                       from `offset` (Phi's row also holds fc1)
    cos, sin [batch, seq, rotary_dim]                  the rotary tables of this step's positions
    k_cache, v_cache [batch, kv_heads, max_seq, d]     owned by the runtime; rows past..past+seq are
                                                       written, nothing else is touched
    q        [batch, heads, seq, d]                    out: the queries, rotated

The first `rotary_dim` features of each q and k head rotate (rotate_half form), the rest pass
through; v is copied. This is the cache contract of the runtime: one preallocated buffer per
layer and kind, written at the current length, read by attention up to past + seq.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeCacheSpec:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # 0: no rotation (GPT-2, OPT)
    dtype: str = "float32"
    row_width: int = 0  # 0: exactly q, k and v
    offset: int = 0

    @staticmethod
    def of(node) -> "RopeCacheSpec":
        rd = node.attrs["rotary_dim"]
        d = node.outputs[0].shape[3]
        rotary = len(node.inputs) > 3 and node.inputs[3] is not None
        return RopeCacheSpec(node.attrs["heads"], node.attrs["kv_heads"], d, (rd or d) if rotary else 0,
                             node.outputs[0].dtype.numpy().name)


def prim_func(spec: RopeCacheSpec):
    from tvm.script import tirx as T

    hq, hkv, d, dt = spec.heads, spec.kv_heads, spec.head_dim, spec.dtype
    width = spec.row_width or (hq + 2 * hkv) * d
    off = spec.offset
    rd = max(spec.rotary_dim, 2)  # the tables' width (unused when there is no rotation)
    half = rd // 2
    rotate = spec.rotary_dim > 0

    def rotated(x, vb, vs, base, vd, cos, sin):
        """Feature vd of a head starting at column `base` of the projection row, rotated."""
        if not rotate:
            return x[vb, vs, base + vd]
        partner = T.if_then_else(vd < half, -x[vb, vs, base + vd + half], x[vb, vs, base + vd - half])
        return T.if_then_else(vd < rd, x[vb, vs, base + vd] * cos[vb, vs, vd] + partner * sin[vb, vs, vd],
                              x[vb, vs, base + vd])

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
        kc = T.match_buffer(kc_h, (b, hkv, m, d), dt)
        vc = T.match_buffer(vc_h, (b, hkv, m, d), dt)
        q = T.match_buffer(q_h, (b, hq, s, d), dt)
        for bi, hi, si, di in T.grid(b, hq, s, d):
            with T.sblock("q"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                q[vb, vh, vs, vd] = rotated(qkv, vb, vs, off + vh * d, vd, cos, sin)
        for bi, hi, si, di in T.grid(b, hkv, s, d):
            with T.sblock("kv"):
                vb, vh, vs, vd = T.axis.remap("SSSS", [bi, hi, si, di])
                kc[vb, vh, past + vs, vd] = rotated(qkv, vb, vs, off + (hq + vh) * d, vd, cos, sin)
                vc[vb, vh, past + vs, vd] = qkv[vb, vs, off + (hq + hkv + vh) * d + vd]

    return main


def build(spec: RopeCacheSpec, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func(spec)}), target=tvm.target.Target(target))
