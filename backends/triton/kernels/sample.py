"""Greedy sampling on the device: the index of the largest logit of each sequence's last
position (the first one where several are equal, as numpy's argmax), so that a decode step
copies back one token per sequence instead of its logits. Grid (batch,)."""

import triton
import triton.language as tl


@triton.jit
def argmax(LOGITS, TOKEN, D, batch, seq, VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    row = LOGITS + (b * seq + seq - 1).to(tl.int64) * VOCAB
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, VOCAB, BLOCK):
        vs = v0 + tl.arange(0, BLOCK)
        x = tl.load(row + vs, mask=vs < VOCAB, other=float("-inf"))
        better = x > best  # strictly: each lane keeps its first maximum
        best = tl.where(better, x, best)
        where = tl.where(better, vs, where)
    top = tl.max(best, 0)
    tl.store(TOKEN + b, tl.min(tl.where(best == top, where, VOCAB), 0))
