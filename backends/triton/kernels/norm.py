"""Norms that stand alone in Triton: `add_norm` (s = a + b; y = norm(s)), `rms_norm` /
`layer_norm` (ADD 0: y = norm(a)) and `norm_add` (RESIDUAL 1: y = norm(a) + b), over the last N
features. Rows as `linear.rows_of` counts them;
one program per row, f32 arithmetic. Grid (rows,)."""

import triton
import triton.language as tl

from .linear import rows_of  # noqa: F401 (a jit function the kernel calls)


@triton.jit
def norm(A, B, SCALE, BIAS, S, Y, D, batch, seq,
         N: tl.constexpr, ADD: tl.constexpr, LAYER: tl.constexpr, HAS_BIAS: tl.constexpr, EPS: tl.constexpr,
         SEQ_ROWS: tl.constexpr, ROWS_MUL: tl.constexpr, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    if row >= rows_of(batch, seq, SEQ_ROWS, ROWS_MUL):
        return
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    s = tl.load(A + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        s += tl.load(B + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * N + cols, s, mask=mask)
    if LAYER:
        mean = tl.sum(s, 0) / N
        dev = tl.where(mask, s - mean, 0.0)
    else:
        dev = s
    rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, 0) / N + EPS)
    y = dev * rstd * tl.load(SCALE + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(BIAS + cols, mask=mask, other=0.0)
    if RESIDUAL:
        y += tl.load(B + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y, mask=mask)
