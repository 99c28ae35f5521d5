"""`attention` on GPUs (opencl, metal): the keys split into chunks, each chunk a work-group,
then one kernel that combines the chunks (split-K attention, "flash decoding").

    per chunk c of `chunk` keys (kernel 1, a group per (batch, head, query, chunk)):
        s_j = score(q, k_j)                            scaled, masked: `attention.Operands`
        m_c = max_j s_j,  l_c = sum_j e^(s_j - m_c),  o_c = sum_j e^(s_j - m_c) v_j
    per query (kernel 2, a thread per output element):
        M = max_c m_c,  y = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c

At decode a query's keys are spread over ceil(kv_len / chunk) groups instead of one, so a
long cache keeps the GPU busy at batch 1, and each group's scores and numerators stay in local
memory: the keys are read once, the values once, and only 2 + head_dim floats per chunk go to
global memory. Kernel 1's threads each score `chunk / threads` keys (the dot product over
head_dim in the thread), meet in cross-thread reductions for m_c and l_c, then each owns
head_dim / threads output elements of o_c. A chunk past the keys (or a query that sees none
of its keys) gives m_c = -inf and zero sums, and a query that sees no key at all gets zeros,
as the op says. Prefill runs the same kernels with a group per (query, chunk).

Knobs: `chunk` (keys per group) and `threads` (per group).
"""

from __future__ import annotations

from ..attention import AttentionSpec, Operands
from .lowering import bind_reduction, rfactor
from ...knobs import Knob

CHUNKS = (64, 128, 32, 256)
THREADS = (64, 32, 128)


def knobs(spec: AttentionSpec) -> list[Knob]:
    return [Knob("chunk", CHUNKS, 1), Knob("threads", THREADS, 1)]


def default_config(spec: AttentionSpec) -> dict:
    return {k.name: k.values[0] for k in knobs(spec)}


def prim_func(spec: AttentionSpec, chunk: int):
    from tvm import te, tirx, topi

    ops = Operands(spec)
    b, s, t, _ = ops.dims
    # int64 heads like the dims: the schedule fuses (batch, heads), whose block vars must stay affine
    h, d, dt = tirx.IntImm("int64", spec.heads), spec.head_dim, spec.dtype
    chunks = (t + chunk - 1) // chunk
    neg_inf, zero = ops.neg_inf, tirx.const(0, dt)

    def key(c, j):  # a chunk's position j; past the keys it reads the last one, masked below
        return tirx.min(c * chunk + j, t - 1)

    rd = te.reduce_axis((0, d), name="rd")
    raw = te.compute((b, h, s, chunks, chunk), lambda bi, hi, si, c, j: te.sum(
        ops.dot(bi, hi, si, key(c, j), rd), axis=rd), name="raw")
    scores = te.compute((b, h, s, chunks, chunk), lambda bi, hi, si, c, j: tirx.Select(
        c * chunk + j < t, ops.score(raw[bi, hi, si, c, j], bi, hi, si, key(c, j)), neg_inf), name="scores")
    rj = te.reduce_axis((0, chunk), name="rj")
    peak = te.compute((b, h, s, chunks), lambda bi, hi, si, c: te.max(scores[bi, hi, si, c, rj], axis=rj),
                      name="peak")

    def safe(v):  # a max of no key: subtract 0 instead of -inf (the weights are zeros anyway)
        return tirx.Select(v == neg_inf, zero, v)

    ex = topi.fast_exp(te.compute((b, h, s, chunks, chunk), lambda bi, hi, si, c, j: scores[bi, hi, si, c, j]
                                  - safe(peak[bi, hi, si, c]), name="shifted"))
    rj = te.reduce_axis((0, chunk), name="rj")

    def numerator(bi, hi, si, c, di):  # column d: the softmax's denominator; d + 1: the chunk's max
        p, at = ex[bi, hi, si, c, rj], key(c, rj)
        return tirx.Select(di < d, ops.weight(p, bi, hi, at) * ops.value(bi, hi, at, tirx.min(di, d - 1)),
                           tirx.Select(di == d, p, tirx.Select(rj == 0, peak[bi, hi, si, c], zero)))

    # the only result of a group, to global memory: its numerators, denominator and max
    num = te.compute((b, h, s, chunks, d + 2), lambda bi, hi, si, c, di: te.sum(numerator(bi, hi, si, c, di),
                                                                                axis=rj), name="num")
    chunk_max = lambda bi, hi, si, c: num[bi, hi, si, c, d + 1]  # noqa: E731
    rc = te.reduce_axis((0, chunks), name="rc")
    top = te.compute((b, h, s), lambda bi, hi, si: te.max(chunk_max(bi, hi, si, rc), axis=rc), name="top")

    def rescale(bi, hi, si, c):  # exp(-inf) = 0: a chunk without keys weighs nothing
        return te.exp(chunk_max(bi, hi, si, c) - safe(top[bi, hi, si]))

    rc = te.reduce_axis((0, chunks), name="rc")
    total = te.compute((b, h, s), lambda bi, hi, si: te.sum(
        rescale(bi, hi, si, rc) * num[bi, hi, si, rc, d], axis=rc), name="total")
    rc = te.reduce_axis((0, chunks), name="rc")
    out = te.compute((b, h, s, d), lambda bi, hi, si, di: te.sum(
        rescale(bi, hi, si, rc) * num[bi, hi, si, rc, di], axis=rc), name="out")

    def normalized(bi, hi, si, di):
        return tirx.Select(total[bi, hi, si] > 0, out[bi, hi, si, di] / total[bi, hi, si], zero)

    if spec.merge_heads:
        y = te.compute((b, s, h * d), lambda bi, si, c: normalized(bi, c // d, si, c % d), name="y")
    else:
        y = te.compute((b, h, s, d), normalized, name="y")
    return te.create_prim_func(ops.args(y, t))


def schedule(spec: AttentionSpec, config: dict | None = None):
    """Kernel 1: blockIdx.x = batch * heads * queries * chunks, threadIdx.x = `threads`.
    Kernel 2: a thread per output element, 256 a group."""
    import tvm

    config = {**default_config(spec), **(config or {})}
    chunk, threads = config["chunk"], min(config["threads"], config["chunk"])
    sch = tvm.s_tir.Schedule(prim_func(spec, chunk))
    for name in ("scores", "shifted"):
        sch.compute_inline(sch.get_sblock(name))
    peak = sch.get_sblock("peak")
    peak_partial = rfactor(sch, peak, threads)
    # kernel 1, anchored at the numerators: a group per (batch, head, query, chunk)
    num = sch.get_sblock("num")
    bi, hi, si, group, di, rj = sch.get_loops(num)
    # (the fused loop has a constant inner extent: its block vars stay affine)
    sch.bind(sch.fuse(bi, hi), "blockIdx.z")
    sch.bind(si, "blockIdx.y")
    sch.bind(group, "blockIdx.x")
    sch.bind(sch.split(di, [None, threads])[1], "threadIdx.x")
    scores = [sch.get_sblock(name) for name in ("raw", "T_fast_exp")]  # a score per key, in local memory
    for block in scores:
        sch.set_scope(block, 0, "shared")
    for block in (scores[1], peak, peak_partial, scores[0]):
        sch.compute_at(block, group)
    for block in scores:  # the keys over the threads
        sch.bind(sch.split(sch.get_loops(block)[3], [None, threads])[1], "threadIdx.x")
    bind_reduction(sch, peak, peak_partial, 3)
    # kernel 2: a thread per output element, its reductions over the chunks serial in it
    y = sch.get_sblock("y")
    groups, items = sch.split(sch.fuse(*sch.get_loops(y)), [None, 256])
    sch.bind(groups, "blockIdx.x")
    sch.bind(items, "threadIdx.x")
    for name in ("out", "total", "top"):
        block = sch.get_sblock(name)
        sch.compute_at(block, items)
        sch.set_scope(block, 0, "local")
    return sch.mod
