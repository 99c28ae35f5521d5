"""`attention` as a TVM kernel: softmax(q k^T * scale + mask) v over a KV cache.

q [batch, heads, seq, d]; k, v [batch, kv_heads, max_seq, d] (or [batch, max_seq, kv_heads, d]:
the spec's `order`), the runtime's caches, of which the first kv_len positions are read (grouped-query: each kv head serves heads / kv_heads query heads);
mask [batch, 1, seq, kv_len], additive, whose last dim gives kv_len; with `merge_heads` the output
is [batch, seq, heads * d]. A paged cache ([blocks, kv_heads, page, d]) is read through each
sequence's block table, and each sequence's query i sees its positions up to its own length + i
(`lengths`: the sequences of a batch may hold different lengths; kv_len is the longest).
seq, kv_len and max_seq are symbolic: one build serves prefill and
every decode step. A query that sees no key (its row of the mask all -inf) gets zeros, as the
op says. Without a mask, kv_len comes as a trailing scalar (the run-time `total`: past + seq).

Schedule: every stage runs in parallel over (batch, heads, queries); P @ V keeps d in vector lanes; the
dot products over d vectorize because the target lets LLVM reassociate (`target.host`), and the
softmax's exp is TVM's polynomial one. At decode (12 query / 4 kv heads, d 128, 1024 cached
positions) it reads 4 MB in 0.09 ms, about 46 GB/s. It is still one parallel launch per stage
(8); one parallel region per head would save those launches (TVM 0.27 refused the
compute_at/parallel combination tried).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..cache_layout import kv_index, kv_shape, kv_slot


@dataclass(frozen=True)
class AttentionSpec:
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    masked: bool = True
    is_causal: bool = False
    merge_heads: bool = True
    dtype: str = "float32"
    kv_int8: bool = False  # int8 caches with per-(head, token) scales (rope_cache.quantize_rows)
    order: str = "bhsd"  # the caches' axis order (`plan.KV_ORDERS`)
    page_tokens: int = 0  # a paged cache's block size (`cache_layout.lay_out_caches`); 0: contiguous

    @staticmethod
    def of(node) -> "AttentionSpec":
        q, k = node.inputs[0], node.inputs[1]
        return AttentionSpec(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                             scale=node.attrs["scale"], masked=len(node.inputs) > 3 and node.inputs[3] is not None,
                             is_causal=bool(node.attrs["is_causal"]), merge_heads=bool(node.attrs["merge_heads"]),
                             dtype=q.dtype.numpy().name)

    def arg_names(self) -> list[str]:
        return ["q", "k", "v"] + ["k_scale", "v_scale"] * self.kv_int8 + ["mask"] * self.masked + \
            ["blocks", "lengths"] * bool(self.page_tokens) + ["y"]


class Operands:
    """The function's arguments and its per-element definitions, shared by the CPU's function
    (`prim_func`) and the GPU's (`gpu.attention`): the caches read through their layout, the
    scaled and masked score of one (query, key), and one value element times its scale."""

    def __init__(self, spec: AttentionSpec):
        from tvm import te, tirx

        self.spec = spec
        b, s, t, m = self.dims = tuple(tirx.Var(n, "int64") for n in ("batch", "seq", "kv_len", "max_seq"))
        h, d, dt = spec.heads, spec.head_dim, spec.dtype
        self.q = te.placeholder((b, h, s, d), dt, name="q")
        cache_dt, hkv, order, page = "int8" if spec.kv_int8 else dt, spec.kv_heads, spec.order, spec.page_tokens
        # a paged cache: a pool of n blocks of `page` positions, and each sequence's blocks and length
        rows, positions = (tirx.Var("blocks", "int64"), page) if page else (b, m)
        self.k = te.placeholder(kv_shape(order, rows, hkv, positions, d), cache_dt, name="k")
        self.v = te.placeholder(kv_shape(order, rows, hkv, positions, d), cache_dt, name="v")
        self.scales = [te.placeholder(kv_shape(order, rows, hkv, positions), dt, name=n)
                       for n in ("k_scale", "v_scale")] if spec.kv_int8 else []
        self.paging = [te.placeholder((b, tirx.Var("max_blocks", "int64")), "int32", name="blocks"),
                       te.placeholder((b,), "int32", name="lengths")] if page else []
        self.mask = te.placeholder((b, 1, s, t), dt, name="mask") if spec.masked else None
        self.neg_inf = tirx.const(float("-inf"), dt)

    def at(self, cache, bi, hi, ti, *di):
        """Query head hi's kv head in `cache`, at position ti."""
        spec = self.spec
        row, pos = kv_slot(spec.page_tokens, self.paging[0] if self.paging else None, bi, ti)
        return cache[tuple(kv_index(spec.order, row, hi // (spec.heads // spec.kv_heads), pos, *di))]

    def dot(self, bi, hi, si, ti, rd):
        """q . k over the reduction axis rd (to sum)."""
        return self.q[bi, hi, si, rd] * self.at(self.k, bi, hi, ti, rd).astype(self.spec.dtype)

    def score(self, raw, bi, hi, si, ti):
        """The dot product `raw` of query si and key ti scaled and masked (-inf where unseen)."""
        from tvm import tirx

        spec, (_, s, t, _) = self.spec, self.dims
        x = raw * tirx.const(spec.scale, spec.dtype)
        if spec.kv_int8:  # the key's scale factors out of its dot product
            x = x * self.at(self.scales[0], bi, hi, ti)
        if self.mask is not None:
            x = x + self.mask[bi, 0, si, ti]
        if spec.page_tokens:  # causal within each sequence's own length (the batch's may differ)
            x = tirx.Select(ti <= si + self.paging[1][bi].astype("int64"), x, self.neg_inf)
        elif spec.is_causal:
            x = tirx.Select(ti <= si + t - s, x, self.neg_inf)
        return x

    def weight(self, p, bi, hi, ti):
        """A softmax numerator times the value's scale (int8 caches)."""
        return p * self.at(self.scales[1], bi, hi, ti) if self.spec.kv_int8 else p

    def value(self, bi, hi, ti, di):
        return self.at(self.v, bi, hi, ti, di).astype(self.spec.dtype)

    def args(self, y, t) -> list:
        """The function's arguments around its output y; without a mask, the keys' length t comes
        as a trailing scalar (the cache holds max_seq positions)."""
        return [self.q, self.k, self.v] + self.scales + ([self.mask] if self.mask is not None else []) + \
            self.paging + [y] + ([] if self.mask is not None else [t])


def prim_func(spec: AttentionSpec):
    from tvm import te, tirx, topi

    ops = Operands(spec)
    b, s, t, _ = ops.dims
    h, d, dt = spec.heads, spec.head_dim, spec.dtype
    rd = te.reduce_axis((0, d), name="rd")
    raw = te.compute((b, h, s, t), lambda bi, hi, si, ti: te.sum(ops.dot(bi, hi, si, ti, rd), axis=rd), name="raw")
    scores = te.compute((b, h, s, t), lambda bi, hi, si, ti: ops.score(raw[bi, hi, si, ti], bi, hi, si, ti),
                        name="scores")
    neg_inf = ops.neg_inf
    rt = te.reduce_axis((0, t), name="rt")
    mx = te.compute((b, h, s), lambda bi, hi, si: te.max(scores[bi, hi, si, rt], axis=rt), name="mx")
    # rows that see no key: subtract 0 instead of -inf, and give zero weights below
    safe = te.compute((b, h, s), lambda bi, hi, si: tirx.Select(mx[bi, hi, si] == neg_inf,
                                                                  tirx.const(0, dt), mx[bi, hi, si]), name="safe")
    # TVM's polynomial exp (2.7e-7 relative error, exp(-inf) = 0) vectorizes; the intrinsic is a
    # scalar library call per score
    ex = topi.fast_exp(te.compute((b, h, s, t), lambda bi, hi, si, ti: scores[bi, hi, si, ti] - safe[bi, hi, si],
                                  name="shifted"))
    rt2 = te.reduce_axis((0, t), name="rt2")
    den = te.compute((b, h, s), lambda bi, hi, si: te.sum(ex[bi, hi, si, rt2], axis=rt2), name="den")
    inv = te.compute((b, h, s), lambda bi, hi, si: tirx.Select(den[bi, hi, si] > 0, 1 / den[bi, hi, si],
                                                                tirx.const(0, dt)), name="inv")
    rt3 = te.reduce_axis((0, t), name="rt3")
    out = te.compute((b, h, s, d), lambda bi, hi, si, di: te.sum(
        ops.weight(ex[bi, hi, si, rt3], bi, hi, rt3) * ops.value(bi, hi, rt3, di), axis=rt3), name="pv")
    if spec.merge_heads:
        y = te.compute((b, s, h * d), lambda bi, si, c: out[bi, c // d, si, c % d] * inv[bi, c // d, si], name="y")
    else:
        y = te.compute((b, h, s, d), lambda bi, hi, si, di: out[bi, hi, si, di] * inv[bi, hi, si], name="y")
    return te.create_prim_func(ops.args(y, t))


def schedule(spec: AttentionSpec):
    import tvm

    sch = tvm.s_tir.Schedule(prim_func(spec))
    sch.compute_inline(sch.get_sblock("shifted"))
    for name in ("raw", "scores", "mx", "safe", "T_fast_exp", "den", "inv", "pv"):
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        # (batch, heads, queries): a prefill's 128 queries of 9 heads balance over the threads,
        # which 9 tasks of (batch, heads) did not
        sch.parallel(sch.fuse(*loops[:3]))
    # P @ V: the kv position outside, d in vector lanes
    pv = sch.get_sblock("pv")
    _, di, rt = sch.get_loops(pv)
    sch.reorder(rt, di)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(pv, rt))[-1])
    y = sch.get_sblock("y")
    sch.parallel(sch.fuse(*sch.get_loops(y)[:2]))
    return sch


def build(spec: AttentionSpec, target: dict):
    import tvm

    return tvm.compile(schedule(spec).mod, target=tvm.target.Target(target))
