"""`rope_cache` in Triton: split the merged projection into heads, rotate q and k, and write k
and v into the runtime's caches at position past + i, in place.

qkv [batch, seq, ROW] (f32) holds q, k, v from column OFFSET on; cos, sin [batch, seq, ROTARY]
(absent when ROTARY is 0); QN, KN the q/k norms' weights (QK_NORM 1: RMSNorm of each head,
weights [d]; 2: of the whole projection, [heads*d] and [kv_heads*d]; 0: none); caches [batch, kv_heads, MAX_SEQ, d] (f32, f16, or int8 with scales
[batch, kv_heads, MAX_SEQ]: each head's row scaled by its largest magnitude / 127; with
SEQ_MAJOR [batch, MAX_SEQ, kv_heads, ...]; paged, blocks of PAGE positions through the block
table BLOCKS: `attention.cache_row`); q out [batch, heads, seq, d] (f32). `past` is read from
device memory (D = [past, total]), or paged, each sequence's from LENGTHS [batch].
Grid (batch * seq, heads + 2 * kv_heads): one program per token and head.
"""

import triton
import triton.language as tl

from .attention import cache_row, sequence_past  # noqa: F401 (jit functions the kernel calls)


@triton.jit
def rope_cache(QKV, COS, SIN, QN, KN, KC, VC, KS, VS, BLOCKS, LENGTHS, Q, D, batch, seq,
               HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr,
               ROW: tl.constexpr, OFFSET: tl.constexpr, MAX_SEQ: tl.constexpr, KV_INT8: tl.constexpr,
               BD: tl.constexpr, SEQ_MAJOR: tl.constexpr, PAGE: tl.constexpr, MAX_BLOCKS: tl.constexpr,
               QK_NORM: tl.constexpr, EPS: tl.constexpr, BW: tl.constexpr):
    token = tl.program_id(0)  # b * seq + i
    slot = tl.program_id(1)
    b = token // seq
    i = token % seq
    past = sequence_past(D, LENGTHS, b, PAGE)
    ds = tl.arange(0, BD)
    d_mask = ds < HEAD_DIM
    row = QKV + token * ROW + OFFSET + slot * HEAD_DIM
    x = tl.load(row + ds, mask=d_mask, other=0.0).to(tl.float32)
    # q and k: each feature's norm factor (1 without norms), and for the rotation its partner's
    ds_partner = tl.where(ds < ROTARY // 2, ds + ROTARY // 2, ds - ROTARY // 2)
    scale = tl.full([BD], 1.0, tl.float32)
    scale_partner = scale
    if QK_NORM > 0:
        if slot < HEADS + KV_HEADS:
            is_k = slot >= HEADS
            head = slot - is_k.to(tl.int32) * HEADS
            if QK_NORM == 1:
                sums = tl.sum(x * x, 0)
                width = HEAD_DIM
                first = 0
            else:  # the whole projection: this token's q (or k) heads
                width = tl.where(is_k, KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM)
                part = QKV + token * ROW + OFFSET + is_k.to(tl.int32) * HEADS * HEAD_DIM
                acc = tl.zeros([BW], tl.float32)
                for c in range(0, width, BW):
                    cs = c + tl.arange(0, BW)
                    y = tl.load(part + cs, mask=cs < width, other=0.0).to(tl.float32)
                    acc += y * y
                sums = tl.sum(acc, 0)
                first = head * HEAD_DIM
            rstd = 1.0 / tl.sqrt(sums / width + EPS)
            if is_k:
                w = tl.load(KN + first + ds, mask=d_mask, other=0.0).to(tl.float32)
                w_partner = tl.load(KN + first + ds_partner, mask=d_mask, other=0.0).to(tl.float32)
            else:
                w = tl.load(QN + first + ds, mask=d_mask, other=0.0).to(tl.float32)
                w_partner = tl.load(QN + first + ds_partner, mask=d_mask, other=0.0).to(tl.float32)
            scale = rstd * w
            scale_partner = rstd * w_partner
            x = x * scale
    if ROTARY > 0:
        if slot < HEADS + KV_HEADS:  # q and k rotate; v does not
            half = ROTARY // 2
            partner = tl.where(ds < half, -tl.load(row + ds + half, mask=ds < half, other=0.0),
                               tl.load(row + ds - half, mask=(ds >= half) & (ds < ROTARY), other=0.0))
            partner = partner.to(tl.float32) * scale_partner
            turn = ds < ROTARY
            cos = tl.load(COS + token * ROTARY + ds, mask=turn, other=1.0)
            sin = tl.load(SIN + token * ROTARY + ds, mask=turn, other=0.0)
            x = tl.where(turn, x * cos + partner.to(tl.float32) * sin, x)
    if slot < HEADS:
        tl.store(Q + ((b * HEADS + slot) * seq + i) * HEAD_DIM + ds, x, mask=d_mask)
    else:
        is_v = slot >= HEADS + KV_HEADS
        h = slot - HEADS - is_v.to(tl.int32) * KV_HEADS
        at = cache_row(BLOCKS, b, h, past + i, KV_HEADS, MAX_SEQ, SEQ_MAJOR, PAGE, MAX_BLOCKS)
        if KV_INT8:
            top = tl.maximum(tl.max(tl.where(d_mask, tl.abs(x), 0.0), 0), 1e-30)
            q8 = tl.floor(x * 127.0 / top + 0.5).to(tl.int8)
            if is_v:
                tl.store(VC + at * HEAD_DIM + ds, q8, mask=d_mask)
                tl.store(VS + at, top / 127.0)
            else:
                tl.store(KC + at * HEAD_DIM + ds, q8, mask=d_mask)
                tl.store(KS + at, top / 127.0)
        else:
            if is_v:
                tl.store(VC + at * HEAD_DIM + ds, x.to(VC.dtype.element_ty), mask=d_mask)
            else:
                tl.store(KC + at * HEAD_DIM + ds, x.to(KC.dtype.element_ty), mask=d_mask)
