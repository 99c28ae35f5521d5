"""`attention` in Triton: flash attention over the runtime's KV cache, split over the keys.

q [batch, heads, seq, d] (f32); k, v [batch, kv_heads, MAX_SEQ, d], the caches (f32, f16, or
int8 with f32 scales [batch, kv_heads, MAX_SEQ]; with SEQ_MAJOR [batch, MAX_SEQ, kv_heads, ...];
paged, PAGE > 0, a pool [blocks, kv_heads, PAGE, ...] read through each sequence's row of the
block table BLOCKS [batch, MAX_BLOCKS]: `cache_row`), of which the first `total` positions are
read (paged, each sequence's own: LENGTHS [batch] holds its past);
`total` (and `past`) come from device memory (D = [past, total]), so one captured decode step
serves every position. Grouped-query: head h reads kv head h // (heads / kv_heads). The mask is
causal (query i sees keys up to past + i) or additive [batch, 1, seq, total] (f32).

`partial` runs the online softmax over one of SPLITS slices of the keys for BLOCK_M queries of
one head: with SPLITS 1 it writes the output, else its slice's normalized output and
log-sum-exp to P [batch * heads * seq, SPLITS, BD + 1], which `merge` combines (flash-decoding:
at decode, batch * heads programs alone would leave most of a GPU idle). A query that sees no
key gets zeros, as the op says.
"""

import triton
import triton.language as tl


@triton.jit
def cache_row(BLOCKS, b, h, pos, KV_HEADS: tl.constexpr, MAX_SEQ: tl.constexpr, SEQ_MAJOR: tl.constexpr,
              PAGE: tl.constexpr, MAX_BLOCKS: tl.constexpr):
    """The row (of HEAD_DIM values, or the one scale) of sequence b, kv head h, position pos in a
    cache laid out [batch, kv_heads, MAX_SEQ] or, SEQ_MAJOR, [batch, MAX_SEQ, kv_heads]; paged
    (PAGE > 0), in the block BLOCKS[b, pos // PAGE] of a pool of such rows of PAGE positions
    (positions past the table, which callers mask out, read its last entry)."""
    if PAGE > 0:
        row = tl.load(BLOCKS + b * MAX_BLOCKS + tl.minimum(pos // PAGE, MAX_BLOCKS - 1))
        at = pos % PAGE
        length = PAGE
    else:
        row = b
        at = pos
        length = MAX_SEQ
    if SEQ_MAJOR:
        return (row * length + at) * KV_HEADS + h
    return (row * KV_HEADS + h) * length + at


@triton.jit
def sequence_past(D, LENGTHS, b, PAGE: tl.constexpr):
    """The positions sequence b already caches: the step's past (D[0]), or in a paged cache its
    own (LENGTHS[b]: the sequences of a batch may differ)."""
    if PAGE > 0:
        return tl.load(LENGTHS + b)
    return tl.load(D)


@triton.jit
def partial(Q, K, V, KS, VS, MASK, BLOCKS, LENGTHS, Y, P, D, batch, seq,
            HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_SEQ: tl.constexpr,
            SCALE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, KV_INT8: tl.constexpr,
            MERGE_HEADS: tl.constexpr, SPLITS: tl.constexpr, DOT_F16: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, SEQ_MAJOR: tl.constexpr,
            PAGE: tl.constexpr, MAX_BLOCKS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Grid (cdiv(seq, BLOCK_M), batch * heads, SPLITS). Paged, attention is causal within each
    sequence's own length: the pool's other positions are other sequences'."""
    total = tl.load(D + 1)
    bh = tl.program_id(1)
    b = bh // HEADS
    past = sequence_past(D, LENGTHS, b, PAGE)
    h = bh % HEADS
    kvh = h // (HEADS // KV_HEADS)
    qs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = qs < seq
    ds = tl.arange(0, BD)
    d_mask = ds < HEAD_DIM
    q = tl.load(Q + ((bh * seq + qs[:, None]) * HEAD_DIM + ds[None, :]), mask=q_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    # this program's slice of the keys, whole blocks; causal queries see no key past past + seq
    chunk = tl.cdiv(tl.cdiv(total, SPLITS), BLOCK_N) * BLOCK_N
    start = tl.program_id(2) * chunk
    end = tl.minimum(start + chunk, total)
    if CAUSAL or PAGE > 0:
        end = tl.minimum(end, past + tl.program_id(0) * BLOCK_M + BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BD], tl.float32)
    for k0 in range(start, end, BLOCK_N):
        ks = k0 + tl.arange(0, BLOCK_N)
        k_mask = ks < end
        kv_mask = k_mask[:, None] & d_mask[None, :]
        rows = cache_row(BLOCKS, b, kvh, ks, KV_HEADS, MAX_SEQ, SEQ_MAJOR, PAGE, MAX_BLOCKS)
        k = tl.load(K + rows[:, None] * HEAD_DIM + ds[None, :], mask=kv_mask, other=0).to(tl.float32)
        v = tl.load(V + rows[:, None] * HEAD_DIM + ds[None, :], mask=kv_mask, other=0).to(tl.float32)
        if KV_INT8:
            k = k * tl.load(KS + rows, mask=k_mask, other=0.0)[:, None]
            v = v * tl.load(VS + rows, mask=k_mask, other=0.0)[:, None]
        if DOT_F16:
            s = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = s * SCALE
        if SOFTCAP > 0:  # SOFTCAP * tanh(s / SOFTCAP), tanh through exp (saturates to +-1)
            s = SOFTCAP * (1.0 - 2.0 / (tl.exp(2.0 * s / SOFTCAP) + 1.0))
        visible = q_mask[:, None] & k_mask[None, :]
        if CAUSAL or PAGE > 0:
            visible = visible & (ks[None, :] <= past + qs[:, None])
        if MASKED:
            s += tl.load(MASK + (b * seq + qs[:, None]) * total + ks[None, :], mask=visible, other=0.0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        if DOT_F16:
            pv = tl.dot(p.to(tl.float16), v.to(tl.float16))
        else:
            pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m = m_new
    seen = l > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l, 1.0)[:, None], 0.0)
    if SPLITS == 1:
        store_output(Y, out, b, h, qs, q_mask, ds, d_mask, seq, HEADS, HEAD_DIM, MERGE_HEADS)
    else:
        row = (bh * seq + qs) * SPLITS + tl.program_id(2)
        lse = tl.where(seen, tl.where(seen, m, 0.0) + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
        tl.store(P + row[:, None] * (BD + 1) + ds[None, :], out, mask=q_mask[:, None])
        tl.store(P + row * (BD + 1) + BD, lse, mask=q_mask)


@triton.jit
def store_output(Y, out, b, h, qs, q_mask, ds, d_mask, seq, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MERGE_HEADS: tl.constexpr):
    """y [batch, seq, heads * d] (MERGE_HEADS) or [batch, heads, seq, d]."""
    if MERGE_HEADS:
        where = ((b * seq + qs[:, None]) * HEADS + h) * HEAD_DIM + ds[None, :]
    else:
        where = ((b * HEADS + h) * seq + qs[:, None]) * HEAD_DIM + ds[None, :]
    tl.store(Y + where, out, mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def merge(Q, K, V, KS, VS, MASK, BLOCKS, LENGTHS, Y, P, D, batch, seq,
          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_SEQ: tl.constexpr,
          SCALE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, KV_INT8: tl.constexpr,
          MERGE_HEADS: tl.constexpr, SPLITS: tl.constexpr, DOT_F16: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BD: tl.constexpr, SEQ_MAJOR: tl.constexpr,
          PAGE: tl.constexpr, MAX_BLOCKS: tl.constexpr, SOFTCAP: tl.constexpr):
    """The slices' outputs weighted by their share of the softmax; grid (cdiv(seq, BLOCK_M),
    batch * heads). Takes `partial`'s arguments, so one launch description serves both."""
    bh = tl.program_id(1)
    qs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_mask = qs < seq
    ds = tl.arange(0, BD)
    d_mask = ds < HEAD_DIM
    splits = tl.arange(0, SPLITS)
    rows = (bh * seq + qs[:, None]) * SPLITS + splits[None, :]  # [BLOCK_M, SPLITS]
    lse = tl.load(P + rows * (BD + 1) + BD, mask=q_mask[:, None], other=float("-inf"))
    top = tl.max(lse, 1)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - top_safe[:, None]))
    total = tl.sum(weight, 1)
    part = tl.load(P + rows[:, :, None] * (BD + 1) + ds[None, None, :], mask=q_mask[:, None, None], other=0.0)
    out = tl.sum(part * weight[:, :, None], 1) / tl.where(total > 0.0, total, 1.0)[:, None]
    store_output(Y, out, bh // HEADS, bh % HEADS, qs, q_mask, ds, d_mask, seq, HEADS, HEAD_DIM, MERGE_HEADS)
