"""`fused_linear` in Triton: norm prologue, GEMV (decode) or tiled GEMM (prefill), epilogue.

    h = norm(x)                  rms or layer norm over the K input features, when NORM
    acc[m, n] = sum_k h[m, k] * w[n, k]         w dequantized in registers (QUANT 8 or 4)
    y = epilogue(acc)            + bias, act(acc) or act(gate) * up (GATED), + residual

Arguments, for both kernels: the eight operand slots of the op (absent ones point anywhere,
their flag is off), the output, the run-time dims D (past, total: unused here), batch and seq,
which give the rows (`rows_of`). Activations are f32; weights f32, f16 or bf16 (or int8 / 4-bit nibbles with f32
scales); sums are f32. With DOT_F16 the GEMM's tiles go to the tensor cores as f16.

Weight layouts (packed at compile time, `llmc.backends.triton.planner`): dense and int8 [n, k] as
the graph holds them (a program reads BLOCK_N rows of contiguous K); 4-bit [n, k / 2] bytes with
input features 2i and 2i + 1 in the low and high nibble; scales and zeros [n, k / GROUP].
"""

import triton
import triton.language as tl

PREFILL_ROWS = 128  # the row count the prefill knobs are tuned at


def knobs(out_n: int) -> list[tuple]:
    """The tuner's knobs of a GEMM of `out_n` output features, each (name, values with the default
    first, the rows it is measured at): `llmc.backends.knobs.Knob`. Decode (`gemv`): output rows
    per program and warps; the default gives enough programs that every SM streams (several
    hundred on a GPU of 100+ SMs), each reading BLOCK_N whole rows. Prefill (`gemm`): the output
    tile (BLOCK_M x BLOCK_N), warps and pipeline stages. Defaults are untuned starting points; a
    table tuned on a GPU replaces them (`llmc compile --tuning FILE`)."""
    block_n = 16 if out_n < 2048 else max(4, min(16, 1 << ((out_n // 512).bit_length() - 1)))
    return [("gemv_block_n", (block_n, *(b for b in (4, 8, 16, 32) if b != block_n)), 1),
            ("gemv_warps", (4, 2, 8), 1),
            ("gemm_tile", ("64x64", "128x64", "64x128", "128x128", "32x64"), PREFILL_ROWS),
            ("gemm_warps", (4, 8), PREFILL_ROWS),
            ("gemm_stages", (3, 2, 4), PREFILL_ROWS)]


@triton.jit
def rows_of(batch, seq, SEQ_ROWS: tl.constexpr, ROWS_MUL: tl.constexpr):
    """The input's rows: batch * seq * ROWS_MUL, or batch * ROWS_MUL (an input of one position)."""
    if SEQ_ROWS:
        return batch * seq * ROWS_MUL
    return batch * ROWS_MUL


@triton.jit
def activate(y, ACT: tl.constexpr):
    """ACT: 0 none, 1 relu, 2 silu, 3 gelu (erf), 4 gelu (tanh)."""
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 3:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 4:
        u = tl.minimum(0.7978845608028654 * (y + 0.044715 * y * y * y), 20.0)  # tanh(20) is 1 in f32
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u)
    return y


@triton.jit
def row_stats(X, rows, row_mask, K: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Mean and 1/std of each row of x [rows, K] (mean 0 for rms): once per row and program."""
    total = tl.zeros([rows.shape[0]], tl.float32)
    squares = tl.zeros([rows.shape[0]], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x, 1)
        squares += tl.sum(x * x, 1)
    if NORM == 2:  # layer norm
        mean = total / K
        var = squares / K - mean * mean
    else:
        mean = total * 0.0
        var = squares / K
    return mean, 1.0 / tl.sqrt(var + EPS)


@triton.jit
def weights(W, WS, WZ, ns, n_mask, ks, k0, K: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """The weight tile [len(ns), len(ks)] as f32, dequantized (w8: the scale comes later)."""
    mask = n_mask[:, None] & (ks[None, :] < K)
    if QUANT == 4:
        byte = tl.load(W + ns[:, None] * (K // 2) + ks[None, :] // 2, mask=mask, other=0)
        q = ((byte >> ((ks[None, :] % 2) * 4).to(tl.uint8)) & 15).to(tl.float32)
        g = ns[:, None] * (K // GROUP) + ks[None, :] // GROUP
        w = (q - tl.load(WZ + g, mask=mask, other=0.0)) * tl.load(WS + g, mask=mask, other=0.0)
    else:
        w = tl.load(W + ns[:, None] * K + ks[None, :], mask=mask, other=0).to(tl.float32)
    return w


@triton.jit
def epilogue(acc, up, ns, n_mask, rows, row_mask, BIAS, RES, WS, N: tl.constexpr, QUANT: tl.constexpr,
             HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr):
    """acc [rows, ns] (and up, when GATED) -> y: w8 scale, bias, activation or gate, residual."""
    if QUANT == 8:
        acc = acc * tl.load(WS + ns, mask=n_mask, other=0.0)[None, :]
        if GATED:
            up = up * tl.load(WS + N + ns, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + ns, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(BIAS + N + ns, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = activate(acc, ACT)
    if GATED:
        y = y * up
    if HAS_RES:
        y += tl.load(RES + rows[:, None] * N + ns[None, :], mask=row_mask[:, None] & n_mask[None, :],
                     other=0.0).to(tl.float32)
    return y


@triton.jit
def normalized(X, NS, NB, rows, row_mask, ks, mean, rstd, K: tl.constexpr, NORM: tl.constexpr):
    """The input tile x[rows, ks] (f32), normalized when NORM (1 rms, 2 layer)."""
    k_mask = ks < K
    x = tl.load(X + rows[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    x = x.to(tl.float32)
    if NORM != 0:
        x = (x - mean[:, None]) * rstd[:, None] * tl.load(NS + ks, mask=k_mask, other=0.0)[None, :]
        if NORM == 2:
            x += tl.load(NB + ks, mask=k_mask, other=0.0)[None, :]
    return x


@triton.jit
def gemv(X, W, BIAS, RES, NS, NB, WS, WZ, Y, D, batch, seq,
         K: tl.constexpr, N: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
         GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, QUANT: tl.constexpr,
         GROUP: tl.constexpr, DOT_F16: tl.constexpr, SEQ_ROWS: tl.constexpr, ROWS_MUL: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A few rows (decode): program (n block, row) reduces BLOCK_N weight rows over all of K,
    reading each weight once per row; grid (cdiv(N, BLOCK_N), rows)."""
    row = tl.program_id(1) + tl.arange(0, 1)
    row_mask = row < rows_of(batch, seq, SEQ_ROWS, ROWS_MUL)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    mean = tl.zeros([1], tl.float32)
    rstd = mean
    if NORM != 0:
        mean, rstd = row_stats(X, row, row_mask, K, NORM, EPS, BLOCK_K)
    acc = tl.zeros([BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = normalized(X, NS, NB, row, row_mask, ks, mean, rstd, K, NORM)
        acc += tl.sum(weights(W, WS, WZ, ns, n_mask, ks, k0, K, QUANT, GROUP) * x, 1)
        if GATED:
            up += tl.sum(weights(W, WS, WZ, ns + N, n_mask, ks, k0, K, QUANT, GROUP) * x, 1)
    y = epilogue(acc[None, :], up[None, :], ns, n_mask, row, row_mask, BIAS, RES, WS, N, QUANT, HAS_BIAS,
                 ACT, GATED, HAS_RES)
    tl.store(Y + row[:, None] * N + ns[None, :], y, mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def dot(a, b, DOT_F16: tl.constexpr):
    """a @ b.T with f32 sums: on f16 tensor cores, or exact f32 (no TF32 rounding)."""
    if DOT_F16:
        return tl.dot(a.to(tl.float16), tl.trans(b.to(tl.float16)))
    return tl.dot(a, tl.trans(b), input_precision="ieee")


@triton.jit
def gemm(X, W, BIAS, RES, NS, NB, WS, WZ, Y, D, batch, seq,
         K: tl.constexpr, N: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr,
         GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, QUANT: tl.constexpr,
         GROUP: tl.constexpr, DOT_F16: tl.constexpr, SEQ_ROWS: tl.constexpr, ROWS_MUL: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Many rows (prefill): a BLOCK_M x BLOCK_N tile per program over K with tl.dot, tiles in
    grouped order (GROUP_M row blocks share their weight columns while they are in L2); grid
    (cdiv(rows, BLOCK_M) * cdiv(N, BLOCK_N),)."""
    rows_total = rows_of(batch, seq, SEQ_ROWS, ROWS_MUL)
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(rows_total, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group = tl.minimum(blocks_m - first_m, GROUP_M)
    bm = first_m + (pid % in_group) % group
    bn = (pid % in_group) // group
    rows = bm * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < rows_total
    ns = bn * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = ns < N
    mean = tl.zeros([BLOCK_M], tl.float32)
    rstd = mean
    if NORM != 0:
        mean, rstd = row_stats(X, rows, row_mask, K, NORM, EPS, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = normalized(X, NS, NB, rows, row_mask, ks, mean, rstd, K, NORM)
        acc += dot(x, weights(W, WS, WZ, ns, n_mask, ks, k0, K, QUANT, GROUP), DOT_F16)
        if GATED:
            up += dot(x, weights(W, WS, WZ, ns + N, n_mask, ks, k0, K, QUANT, GROUP), DOT_F16)
    y = epilogue(acc, up, ns, n_mask, rows, row_mask, BIAS, RES, WS, N, QUANT, HAS_BIAS, ACT, GATED, HAS_RES)
    tl.store(Y + rows[:, None] * N + ns[None, :], y, mask=row_mask[:, None] & n_mask[None, :])
