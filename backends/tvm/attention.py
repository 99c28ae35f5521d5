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

Two paths, taken at run time by the query count (`prim_func`). Decode (fewer than QUERIES
queries): every stage in parallel over (batch, heads, queries); the dot products over d
vectorize because the target lets LLVM reassociate (`target.host`), P @ V keeps d in vector
lanes. At decode (12 query / 4 kv heads, d 128, 1024 cached positions) it reads 4 MB in 0.09 ms,
about 46 GB/s. Prefill: tasks of QUERIES queries of one head; the keys are transposed once per
call to [d, keys], so Q K^T is a register tile of QUERIES x 16 scores (broadcast q, one key
vector load serving every query) and P @ V one of QUERIES x d outputs: SmolLM2's 128-token
prefill spends 6.9 ms in attention over 30 layers, 19.3 before (dot products each ending in a
horizontal sum). A causal prefill still computes the masked half of its scores. The softmax's
exp is TVM's polynomial one on both paths. Each stage is one parallel launch (8 per path).
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
    softcap: float = 0.0  # scores soft-capped: softcap * tanh(score / softcap) (Gemma 2); 0: not

    @staticmethod
    def of(node) -> "AttentionSpec":
        q, k = node.inputs[0], node.inputs[1]
        return AttentionSpec(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                             scale=node.attrs["scale"], masked=len(node.inputs) > 3 and node.inputs[3] is not None,
                             is_causal=bool(node.attrs["is_causal"]), merge_heads=bool(node.attrs["merge_heads"]),
                             dtype=q.dtype.numpy().name, softcap=node.attrs["softcap"])

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
        return self.at_kv(cache, bi, hi // (self.spec.heads // self.spec.kv_heads), ti, *di)

    def at_kv(self, cache, bi, hk, ti, *di):
        """KV head hk in `cache`, at position ti."""
        spec = self.spec
        row, pos = kv_slot(spec.page_tokens, self.paging[0] if self.paging else None, bi, ti)
        return cache[tuple(kv_index(spec.order, row, hk, pos, *di))]

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
        if spec.softcap:
            cap = tirx.const(spec.softcap, spec.dtype)
            x = cap * tirx.tanh(x / cap)
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


QUERIES, KEYS = 4, 16  # a prefill task's queries; keys per vector of scores


def _softmax_pv(ops: Operands, raw, rows: tuple, where, kv, prefix: str):
    """The stages after the scores' dot products, over `rows` (the leading axes; `where(*row)`
    gives the row's (sequence, head, query)) and `kv` keys, a whole number of KEYS-key vectors,
    of which those past kv_len are padding (scores -inf): scores, max, exp, sum and P @ V. Returns (pv, inv): the unnormalized
    outputs [*rows, d] and each row's 1 / sum (0 for a row that sees no key)."""
    from tvm import te, tirx, topi

    spec, (_, _, t, _) = ops.spec, ops.dims
    d, dt, neg_inf = spec.head_dim, spec.dtype, ops.neg_inf
    n = len(rows)

    def score(*a):
        *row, ti = a
        bi, hi, si = where(*row)
        x = ops.score(raw(*a), bi, hi, si, tirx.min(ti, t - 1))
        return tirx.Select(ti < t, x, neg_inf)
    scores = te.compute((*rows, kv), score, name=prefix + "scores")
    rt = te.reduce_axis((0, kv), name="rt")
    mx = te.compute(rows, lambda *r: te.max(scores[(*r, rt)], axis=rt), name=prefix + "mx")
    # rows that see no key: subtract 0 instead of -inf, and give zero weights below
    safe = te.compute(rows, lambda *r: tirx.Select(mx[r] == neg_inf, tirx.const(0, dt), mx[r]), name=prefix + "safe")
    # TVM's polynomial exp (2.7e-7 relative error, exp(-inf) = 0) vectorizes; the intrinsic is a
    # scalar library call per score
    ex = topi.fast_exp(te.compute((*rows, kv), lambda *a: scores[a] - safe[a[:n]], name=prefix + "shifted"))
    # the sum in KEYS lanes, key i in lane i % KEYS, then across the lanes: an order that does
    # not depend on kv (whole vectors of keys), so a sequence's sum is the same in any batch (a
    # batch's kv is its longest sequence's; the keys past a sequence's own add exact zeros)
    K = tirx.const(KEYS, "int64")
    vectors = te.reduce_axis((0, kv // K), name="rt2")
    lanes = te.compute((*rows, K), lambda *a: te.sum(ex[(*a[:n], vectors * K + a[n].astype("int64"))], axis=vectors),
                       name=prefix + "lanes")
    lane = te.reduce_axis((0, K), name="lane")
    den = te.compute(rows, lambda *r: te.sum(lanes[(*r, lane)], axis=lane), name=prefix + "den")
    inv = te.compute(rows, lambda *r: tirx.Select(den[r] > 0, 1 / den[r], tirx.const(0, dt)), name=prefix + "inv")
    rt = te.reduce_axis((0, kv), name="rt3")

    def pv(*a):
        *row, di = a
        bi, hi, _ = where(*row)
        at = tirx.min(rt, t - 1)  # a padding key's weight is 0
        return te.sum(ops.weight(ex[(*row, rt)], bi, hi, at) * ops.value(bi, hi, at, di), axis=rt)
    return te.compute((*rows, d), pv, name=prefix + "pv"), inv


def prim_func(spec: AttentionSpec):
    """Two paths in one function, taken by the query count: below QUERIES (decode), each
    (sequence, head, query) alone, its dot products over the head dim; from QUERIES on
    (prefill), tasks of QUERIES queries of one head, the keys transposed once ([d, keys]) so
    that Q K^T and P V are register-tiled products (QUERIES x KEYS scores, QUERIES x d outputs)
    with no horizontal sums. The other path's stages have extent 0."""
    from tvm import te, tirx

    ops = Operands(spec)
    b, s, t, _ = ops.dims
    h, d, group = spec.heads, spec.head_dim, spec.heads // spec.kv_heads
    tiled = s >= QUERIES
    few = tirx.if_then_else(tiled, 0, s)
    Q, K = (tirx.const(v, "int64") for v in (QUERIES, KEYS))
    # both paths run over the keys padded to whole vectors, the padding masked: every stage's
    # vectors then hold the same keys whatever kv_len is, so a sequence's result does not depend
    # on the batch's longest (LLVM's scalar remainders round differently)
    padded = (t + K - 1) // K * K
    rd = te.reduce_axis((0, d), name="rd")
    raw = te.compute((b, h, few, padded), lambda bi, hi, si, ti: te.sum(
        ops.dot(bi, hi, si, tirx.min(ti, t - 1), rd), axis=rd), name="raw")
    pv, inv = _softmax_pv(ops, lambda *a: raw[a], (b, h, few), lambda bi, hi, si: (bi, hi, si), padded, "")

    nq = (s + Q - 1) // Q  # query tiles per sequence and head
    tasks = tirx.if_then_else(tiled, b * h * nq, 0)
    vectors = tirx.if_then_else(tiled, (t + K - 1) // K, 0)  # of KEYS keys, the last one padded
    keys = vectors * K

    def where(x, r):  # task x's row r: (sequence, head, query), the last tile's rows past s clamped
        return x // (h * nq), x // nq % h, tirx.min(x % nq * Q + r, s - 1)
    kt = te.compute((b, spec.kv_heads, d, keys), lambda bi, hk, di, ti: ops.at_kv(
        ops.k, bi, hk, tirx.min(ti, t - 1), di).astype(spec.dtype), name="kt")
    rd = te.reduce_axis((0, d), name="rd")

    def tile_dot(x, r, vi, lane):
        bi, hi, si = where(x, r)
        return te.sum(ops.q[bi, hi, si, rd] * kt[bi, hi // group, rd, vi * K + lane], axis=rd)
    traw = te.compute((tasks, Q, vectors, K), tile_dot, name="traw")  # whole vectors: no predicated lanes
    tpv, tinv = _softmax_pv(ops, lambda x, r, ti: traw[x, r, ti // K, ti % K], (tasks, Q), where, keys, "t")

    def layout(fn, rows, name):  # the output's layout of fn(sequence, head, query, feature)
        if spec.merge_heads:
            return te.compute((rows, s, h * d), lambda bi, si, c: fn(bi, c // d, si, c % d), name=name)
        return te.compute((rows, h, s, d), lambda bi, hi, si, di: fn(bi, hi, si, di), name=name)

    def tiled_out(bi, hi, si, di):
        x, r = (bi * h + hi) * nq + si // Q, si % Q
        return tpv[x, r, di] * tinv[x, r]
    ty = layout(tiled_out, tirx.if_then_else(tiled, b, 0), "ty")

    def out(bi, hi, si, di):  # the clamps are no-ops that keep the region analysis in bounds
        fi = tirx.min(si, few - 1)
        at = (tirx.min(bi, ty.shape[0] - 1), si, hi * d + di) if spec.merge_heads else \
            (tirx.min(bi, ty.shape[0] - 1), hi, si, di)
        return tirx.if_then_else(tiled, ty[at], pv[bi, hi, fi, di] * inv[bi, hi, fi])
    y = layout(out, b, "y")
    return te.create_prim_func(ops.args(y, t))


def function(spec: AttentionSpec):
    """The scheduled kernel, each path's stages behind its branch: the other path's stages
    have no iterations, but each would still wake the thread pool."""
    sch, paths = _schedule(spec)
    func = sch.mod["main"]
    tiled = func.params[0].shape[2] >= QUERIES  # the queries of q
    return _branched(sch, func, {True: paths["t"], False: paths[""]}, tiled)


def _schedule(spec: AttentionSpec):
    """(schedule, each path's blocks by prefix: "" decode, "t" prefill)."""
    import tvm

    sch = tvm.s_tir.Schedule(prim_func(spec))
    exp = {}  # topi names both paths' exp stages alike: each is its shifted scores' consumer
    for prefix in ("", "t"):
        shifted = sch.get_sblock(prefix + "shifted")
        exp[prefix] = sch.get_consumers(shifted)[0]
        sch.compute_inline(shifted)
    paths = {prefix: [sch.get_sblock(prefix + n) for n in ("raw", "scores", "mx", "safe", "lanes", "den", "inv", "pv")]
             + [exp[prefix]] for prefix in ("", "t")}
    paths["t"].append(sch.get_sblock("kt"))
    # decode: every stage in parallel over (batch, heads, queries)
    for block in paths[""]:
        sch.parallel(sch.fuse(*sch.get_loops(block)[:3]))
    # P @ V: the kv position outside, d in vector lanes
    pv = sch.get_sblock("pv")
    _, di, rt = sch.get_loops(pv)
    sch.reorder(rt, di)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(pv, rt))[-1])

    # prefill: the keys transposed, then every stage in parallel over tasks
    kt = sch.get_sblock("kt")
    sch.parallel(sch.fuse(*sch.get_loops(kt)[:3]))
    for block in [sch.get_sblock(n) for n in ("tscores", "tmx", "tsafe", "tlanes", "tden", "tinv")] + [exp["t"]]:
        sch.parallel(sch.get_loops(block)[0])
    for name in ("lanes", "tlanes"):  # a vector of KEYS partial sums (LLVM vectorizes the lanes: TVM
        block = sch.get_sblock(name)   # refuses to, under the decode path's fused parallel loop)
        *_, lane, vectors = sch.get_loops(block)
        sch.reorder(vectors, lane)
    for block in (sch.get_sblock("scores"), exp[""], sch.get_sblock("tscores"), exp["t"]):  # whole vectors of keys
        sch.vectorize(sch.split(sch.get_loops(block)[-1], [None, KEYS])[1])
    _register_tile(sch, "traw")
    _register_tile(sch, "tpv")
    ty = sch.get_sblock("ty")
    sch.parallel(sch.fuse(*sch.get_loops(ty)[:2]))
    paths["t"].append(ty)
    y = sch.get_sblock("y")
    sch.parallel(sch.fuse(*sch.get_loops(y)[:2]))
    return sch, paths


def _branched(sch, func, paths: dict, cond):
    """func with the outermost loops of paths[True]'s blocks run only where `cond` holds and
    those of paths[False] only where it does not (the rest as they were). Each branch is a
    block: TVM allocates a buffer in the innermost block around its uses, so a path's scratch
    is allocated only when the path runs."""
    from tvm import s_tir, tirx

    root = func.body.block
    tops = {key: [sch.get(sch.get_loops(b)[0]) for b in blocks] for key, blocks in paths.items()}

    def path(stmt):
        return next((key for key, loops in tops.items() if any(stmt.same_as(lp) for lp in loops)), None)
    stmts = list(root.body)
    branches = [tirx.IfThenElse(c, s_tir.SBlockRealize([], True, s_tir.SBlock(
        [], [], [], f"path_{int(key)}", tirx.SeqStmt([st for st in stmts if path(st) is key]))), None)
        for key, c in ((True, cond), (False, tirx.Not(cond)))]
    body = tirx.SeqStmt(branches + [st for st in stmts if path(st) is None])
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                         root.alloc_buffers, root.match_buffers, root.annotations)
    return func.with_body(s_tir.SBlockRealize(func.body.iter_values, func.body.predicate, block))


def _register_tile(sch, name: str):
    """A task's QUERIES rows x a vector of outputs (KEYS scores, or d features) accumulated in
    registers over the reduction, each loaded operand serving every row."""
    block = sch.get_sblock(name)
    x, r, *outer, jl, red = sch.get_loops(block)  # outer: the vectors of scores
    sch.reorder(x, *outer, red, r, jl)
    sch.parallel(x)
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, (x, *outer)[-1])
    sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(r)
    sch.vectorize(jl)
    sch.decompose_reduction(block, red)


def build(spec: AttentionSpec, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": function(spec)}), target=tvm.target.Target(target))
