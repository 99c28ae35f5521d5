"""Each Triton kernel family against its op's numpy definition, under Triton's interpreter
(TRITON_INTERPRET=1, set by conftest): odd sizes, f32 and f16 weights and caches, the quantized
variants, the split (flash-decoding) attention. Tolerances: 1e-5 relative for f32 arithmetic;
f16 operands on the tensor-core path round each product's inputs to 11 bits, hence 2e-3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import llmc.backends.triton.kernels as kernels_package  # noqa: E402
from llmc.ops.nn import attention, layer_norm, rms_norm  # noqa: E402
from llmc.ops.transformer import fused_linear, rope_cache  # noqa: E402
from llmc.backends.tvm.rope_cache import quantize_rows  # noqa: E402
from llmc.runtime.interpret import load_package  # noqa: E402

from conftest import block_table, from_pages, in_kv_order, rel_err, to_pages  # noqa: E402

K = load_package(Path(kernels_package.__file__).parent, ["linear", "attention", "rope_cache", "norm", "sample"])
NONE = torch.zeros(1)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)) if a is not None else NONE


def _dims(past, total):
    return torch.tensor([past, total], dtype=torch.int32)


CONTIGUOUS = dict(PAGE=0, MAX_BLOCKS=1)  # the cache kernels' paging constants, for contiguous caches


ACT = {"": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}
LINEAR_CASES = [dict(), dict(norm="rms", act="silu", gated=1), dict(norm="layer", act="gelu_tanh", res=False),
                dict(act="gelu", quant="w8", gated=1), dict(act="relu", quant="w4", norm="rms", bias=False),
                dict(quant="w4", group=64, norm="layer", gated=1, act="silu")]


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("wdtype", ["float32", "float16"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "plain")
def test_linear(kernel, wdtype, case, rng):
    quant, gated, norm, act = case.get("quant", ""), case.get("gated", 0), case.get("norm", ""), case.get("act", "")
    group = case.get("group", 32)
    m, n, k = (3, 50, 192) if kernel == "gemv" else (37, 50, 192)
    nw = 2 * n if gated else n
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(nw).astype(np.float32) if case.get("bias", True) else None
    res = rng.standard_normal((m, n)).astype(np.float32) if case.get("res", True) else None
    ns, nb = rng.standard_normal(k).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    ws = wz = None
    if quant == "w8":
        w = rng.integers(-127, 128, (nw, k)).astype(np.int8)
        ws = (rng.random(nw) * 0.01).astype(np.float32)
    elif quant == "w4":
        w = rng.integers(0, 16, (nw, k)).astype(np.uint8)
        ws = (rng.random((nw, k // group)) * 0.1).astype(np.float32)
        wz = rng.integers(0, 16, (nw, k // group)).astype(np.float32)
    else:
        w = rng.standard_normal((nw, k)).astype(wdtype)
    want = fused_linear(x, w, bias, res, ns if norm else None, nb if norm == "layer" else None, ws, wz, norm=norm,
                        epsilon=1e-5, activation=act, gated=gated, quant=quant, group_size=group if quant == "w4" else 0)
    stored = (w[:, 0::2] | (w[:, 1::2] << 4)) if quant == "w4" else w
    dot_f16 = int(wdtype == "float16")
    consts = dict(K=k, N=n, NORM={"": 0, "rms": 1, "layer": 2}[norm], EPS=1e-5, ACT=ACT[act], GATED=gated,
                  HAS_BIAS=int(bias is not None), HAS_RES=int(res is not None), QUANT={"": 0, "w8": 8, "w4": 4}[quant],
                  GROUP=group, DOT_F16=dot_f16, SEQ_ROWS=1, ROWS_MUL=1)
    if kernel == "gemv":
        consts.update(BLOCK_N=16, BLOCK_K=32)
        grid = (-(-n // 16), m)
    else:
        consts.update(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
        grid = (-(-m // 16) * -(-n // 32),)
    y = torch.zeros(m, n)
    getattr(K["linear"], kernel)[grid](_t(x), _t(stored), _t(bias), _t(res), _t(ns), _t(nb), _t(ws), _t(wz), y,
                                       _dims(0, 0), 1, m, **consts)
    tol = 2e-3 if dot_f16 and kernel == "gemm" else 1e-5
    assert rel_err(y.numpy(), want) < tol


ATTENTION_CASES = {
    "prefill-masked-gqa": dict(b=1, h=4, kvh=2, s=7, past=0, d=16, masked=True, causal=False, splits=1),
    "prefill-causal-past-odd-d": dict(b=2, h=4, kvh=2, s=5, past=3, d=20, masked=False, causal=True, splits=1,
                                      merge=0),
    "decode-split": dict(b=1, h=4, kvh=4, s=1, past=40, d=16, masked=False, causal=True, splits=4),
    "masked-split-batch": dict(b=2, h=6, kvh=2, s=3, past=45, d=24, masked=True, causal=False, splits=4),
    "decode-int8": dict(b=1, h=4, kvh=2, s=1, past=33, d=16, masked=False, causal=True, splits=2, cache="int8"),
    "decode-f16": dict(b=1, h=4, kvh=2, s=2, past=50, d=32, masked=True, causal=False, splits=2, cache="float16"),
    "softcap-split": dict(b=1, h=4, kvh=2, s=3, past=30, d=16, masked=True, causal=False, splits=2, softcap=0.5),
}


@pytest.mark.parametrize("order", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention(case, order, rng):
    b, h, kvh, s, past, d, splits = (case[k] for k in ("b", "h", "kvh", "s", "past", "d", "splits"))
    cache, max_seq, total = case.get("cache", "float32"), 64, past + s
    q = rng.standard_normal((b, h, s, d)).astype(np.float32)
    kc, vc = (np.zeros((b, kvh, max_seq, d), np.float32) for _ in range(2))
    kc[:, :, :total], vc[:, :, :total] = (rng.standard_normal((b, kvh, total, d)) for _ in range(2))
    ks = vs = None
    if cache == "int8":
        (kc, ks), (vc, vs) = quantize_rows(kc), quantize_rows(vc)
        kf, vf = kc * ks[..., None], vc * vs[..., None]
    else:
        kc, vc = kc.astype(cache), vc.astype(cache)
        kf, vf = kc.astype(np.float32), vc.astype(np.float32)
    mask = None
    if case["masked"]:
        mask = np.where(rng.random((b, 1, s, total)) < 0.8, 0, -np.inf).astype(np.float32)
        mask[0, 0, 0, :] = -np.inf  # a query that sees no key gets zeros
    merge = case.get("merge", 1)
    softcap = case.get("softcap", 0.0)
    want = attention(q, kf[:, :, :total], vf[:, :, :total], mask, scale=0.3, is_causal=int(case["causal"]),
                     merge_heads=merge, softcap=softcap)
    bd = max(16, 1 << (d - 1).bit_length())
    y, partials = torch.zeros(want.shape), torch.zeros(b * h * s * splits * (bd + 1))
    consts = dict(HEADS=h, KV_HEADS=kvh, HEAD_DIM=d, MAX_SEQ=max_seq, SCALE=0.3, MASKED=int(case["masked"]),
                  CAUSAL=int(case["causal"]), KV_INT8=int(cache == "int8"), MERGE_HEADS=merge, SPLITS=splits,
                  DOT_F16=0, BLOCK_M=16, BLOCK_N=16, BD=bd, SEQ_MAJOR=int(order == "bshd"), **CONTIGUOUS,
                  SOFTCAP=softcap)
    kc, vc, ks, vs = (in_kv_order(c, order) for c in (kc, vc, ks, vs))
    args = (_t(q), _t(kc), _t(vc), _t(ks), _t(vs), _t(mask), NONE, NONE, y, partials, _dims(past, total), b, s)
    K["attention"].partial[(-(-s // 16), b * h, splits)](*args, **consts)
    if splits > 1:
        K["attention"].merge[(-(-s // 16), b * h)](*args, **consts)
    assert np.abs(y.numpy() - want).max() < 1e-5


@pytest.mark.parametrize("case", [dict(page=4, seq=1, splits=2, masked=False), dict(page=3, seq=3, splits=1, masked=True),
                                  dict(page=5, seq=1, splits=1, masked=True, int8=True)],
                         ids=["decode-split", "prefill-masked", "int8"])
def test_paged_attention_reads_each_sequence_to_its_own_length(case, rng):
    """Two sequences holding different lengths in one batch, their blocks shuffled over a pool:
    each attends to its own blocks up to its own length (+ its causal position), as if alone;
    the slots past a sequence's length hold large values the kernel must not weigh."""
    page, seq, splits, int8 = case["page"], case["seq"], case["splits"], case.get("int8", False)
    batch, h, kvh, d, max_seq, scale = 2, 4, 2, 16, 37, 0.3
    lengths = np.array([4, 21], np.int32)
    total = int(lengths.max()) + seq
    table, blocks = block_table(batch, max_seq, page, rng)
    q = rng.standard_normal((batch, h, seq, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, kvh, max_seq, d)).astype(np.float32) for _ in range(2))
    for b, n in enumerate(lengths):
        k[b, :, n + seq:], v[b, :, n + seq:] = 1e3, -1e3
    if int8:
        (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
        k, v = kq * ks[..., None], vq * vs[..., None]  # what the kernel reads back
        caches = (kq, vq, ks, vs)
    else:
        caches = (k, v, None, None)
    mask = np.where(rng.random((batch, 1, seq, total)) > 0.3, 0, -np.inf).astype(np.float32)
    mask[..., 0] = 0
    bd = 16
    y, partials = torch.zeros(batch, h, seq, d), torch.zeros(batch * h * seq * splits * (bd + 1))
    consts = dict(HEADS=h, KV_HEADS=kvh, HEAD_DIM=d, MAX_SEQ=max_seq, SCALE=scale, MASKED=int(case["masked"]),
                  CAUSAL=0, KV_INT8=int(int8), MERGE_HEADS=0, SPLITS=splits, DOT_F16=0, BLOCK_M=16, BLOCK_N=16,
                  BD=bd, SEQ_MAJOR=0, PAGE=page, MAX_BLOCKS=table.shape[1], SOFTCAP=0.0)
    pools = [_t(to_pages(c, table, blocks, page)) if c is not None else NONE for c in caches]
    args = (_t(q), *pools, _t(mask if case["masked"] else None), _t(table), _t(lengths), y, partials,
            _dims(int(lengths.max()), total), batch, seq)
    K["attention"].partial[(-(-seq // 16), batch * h, splits)](*args, **consts)
    if splits > 1:
        K["attention"].merge[(-(-seq // 16), batch * h)](*args, **consts)
    for b, n in enumerate(lengths):
        own = n + seq
        causal = np.where(np.arange(own)[None] <= n + np.arange(seq)[:, None], 0, -np.inf).astype(np.float32)
        m = causal + (mask[b:b + 1, :, :, :own] if case["masked"] else 0)
        want = attention(q[b:b + 1], k[b:b + 1, :, :own], v[b:b + 1, :, :own], m, scale=scale)
        assert rel_err(y.numpy()[b:b + 1], want) < 1e-5, b


NO_NORM = dict(QK_NORM=0, EPS=0.0, BW=16)


@pytest.mark.parametrize("rotary,cache,order,norm", [(r, c, "bhsd", "") for r in (16, 8, 0)
                                                     for c in ("float32", "float16", "int8")]
                         + [(16, "float32", "bshd", ""), (8, "int8", "bshd", ""),
                            (16, "float32", "bhsd", "head"), (8, "int8", "bhsd", "all"), (16, "float32", "bhsd", "all")])
def test_rope_cache(rotary, cache, order, norm, rng):
    b, s, past, heads, kv_heads, d, max_seq, offset = 2, 3, 5, 4, 2, 16, 16, 8
    width = offset + (heads + 2 * kv_heads) * d + 4  # q, k, v sit inside a wider projection row
    qkv = rng.standard_normal((b, s, width)).astype(np.float32)
    angles = rng.standard_normal((b, s, max(rotary, 2))).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    past_k, past_v = (rng.standard_normal((b, kv_heads, past, d)).astype(np.float32) for _ in range(2))
    parts = np.split(qkv[..., offset:offset + (heads + 2 * kv_heads) * d], [heads * d, (heads + kv_heads) * d], -1)
    tables = (cos[:, None], sin[:, None]) if rotary else (None, None)
    norms = [(1 + 0.5 * rng.standard_normal(d * (h if norm == "all" else 1))).astype(np.float32)
             for h in (heads, kv_heads)] if norm else [None, None]
    want_q, want_k, want_v = rope_cache(*parts, *tables, past_k, past_v, None, *norms, heads=heads, kv_heads=kv_heads,
                                        rotary_dim=rotary, qk_norm=norm, norm_epsilon=1e-6)
    int8 = cache == "int8"
    kc, vc = (np.zeros((b, kv_heads, max_seq, d), np.int8 if int8 else cache) for _ in range(2))
    ks, vs = (np.zeros((b, kv_heads, max_seq), np.float32) for _ in range(2))
    kc_t, vc_t, ks_t, vs_t = (_t(in_kv_order(c, order)) for c in (kc, vc, ks, vs))
    q = torch.zeros(b, heads, s, d)
    consts = dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, ROTARY=rotary, ROW=width, OFFSET=offset,
                  MAX_SEQ=max_seq, KV_INT8=int(int8), BD=16, SEQ_MAJOR=int(order == "bshd"), **CONTIGUOUS,
                  QK_NORM=("", "head", "all").index(norm), EPS=1e-6, BW=32)  # BW < heads * d: a loop
    K["rope_cache"].rope_cache[(b * s, heads + 2 * kv_heads)](
        _t(qkv), _t(cos if rotary else None), _t(sin if rotary else None), *map(_t, norms), kc_t, vc_t, ks_t, vs_t,
        NONE, NONE, q,
        _dims(past, past + s), b, s, **consts)
    assert np.abs(q.numpy() - want_q).max() < 1e-5
    new = slice(past, past + s)
    for got, scales, want in ((kc_t, ks_t, want_k), (vc_t, vs_t, want_v)):
        got, scales = (in_kv_order(t.numpy(), order) for t in (got, scales))  # back to [b, kv_heads, seq, ...]
        got = got[:, :, new].astype(np.float32)
        if int8:  # within half a step of the row's scale, and the scale is the row's max / 127
            want_q8, want_scale = quantize_rows(want[:, :, new])
            assert np.allclose(scales[:, :, new], want_scale, rtol=1e-6)
            assert np.abs(got - want_q8).max() <= 1
        else:
            assert np.abs(got - want[:, :, new]).max() <= (1e-5 if cache == "float32" else 2e-3 * np.abs(want).max())


@pytest.mark.parametrize("int8", [False, True], ids=["f32", "int8"])
def test_paged_rope_cache_writes_each_sequence_at_its_own_length(int8, rng):
    """Two sequences of different lengths: each token lands in its own sequence's block at its
    own position, as in a contiguous cache; no other slot of the pool changes."""
    b, s, heads, kv_heads, d, max_seq, page = 2, 3, 4, 2, 16, 23, 4
    lengths = np.array([2, 13], np.int32)
    table, blocks = block_table(b, max_seq, page, rng)
    width = (heads + 2 * kv_heads) * d
    qkv = rng.standard_normal((b, s, width)).astype(np.float32)
    angles = rng.standard_normal((b, s, d)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    parts = np.split(qkv, [heads * d, (heads + kv_heads) * d], -1)
    empty = np.zeros((b, kv_heads, 0, d), np.float32)
    want_q, want_k, want_v = rope_cache(*parts, cos[:, None], sin[:, None], empty, empty, heads=heads,
                                        kv_heads=kv_heads, rotary_dim=d)
    before = [rng.standard_normal((b, kv_heads, max_seq, d)).astype(np.float32) for _ in range(2)]
    before += [rng.random((b, kv_heads, max_seq)).astype(np.float32) for _ in range(2)]
    if int8:
        before[:2] = [rng.integers(-127, 128, c.shape).astype(np.int8) for c in before[:2]]
    pools = [_t(to_pages(c, table, blocks, page)) for c in before]
    q = torch.zeros(b, heads, s, d)
    consts = dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, ROTARY=d, ROW=width, OFFSET=0, MAX_SEQ=max_seq,
                  KV_INT8=int(int8), BD=16, SEQ_MAJOR=0, PAGE=page, MAX_BLOCKS=table.shape[1], **NO_NORM)
    K["rope_cache"].rope_cache[(b * s, heads + 2 * kv_heads)](
        _t(qkv), _t(cos), _t(sin), NONE, NONE, *pools, _t(table), _t(lengths), q, _dims(int(lengths.max()), 0), b, s, **consts)
    assert np.abs(q.numpy() - want_q).max() < 1e-5
    got = [from_pages(p.numpy(), table, max_seq) for p in pools]
    written = [want_k, want_v] if not int8 else [*(r[0] for r in map(quantize_rows, (want_k, want_v))),
                                                 *(r[1] for r in map(quantize_rows, (want_k, want_v)))]
    for g, old, w in zip(got, before, written):
        for i, n in enumerate(lengths):
            new = g[i, :, n:n + s]
            if new.dtype == np.int8:
                assert np.abs(new.astype(int) - w[i]).max() <= 1  # rounding at ties
            else:
                np.testing.assert_allclose(new, w[i], rtol=1e-5, atol=1e-6)
            kept = np.ones(max_seq, bool)
            kept[n:n + s] = False
            np.testing.assert_array_equal(g[i, :, kept], old[i, :, kept])  # no other slot changed


@pytest.mark.parametrize("op", ["add_rms", "add_layer", "rms", "layer", "rms_residual"])
def test_norm(op, rng):
    rows, n = 5, 37
    a, b = rng.standard_normal((rows, n)).astype(np.float32), rng.standard_normal((rows, n)).astype(np.float32)
    scale, bias = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    add, layer, residual = op.startswith("add"), op.endswith("layer"), op.endswith("residual")
    s = a + b if add else a
    want = layer_norm(s, scale, bias, epsilon=1e-5) if layer else rms_norm(s, scale, epsilon=1e-5)
    want = want + b if residual else want  # norm_add: b + norm(a)
    y, s_out = torch.zeros(rows, n), torch.zeros(rows, n)
    K["norm"].norm[(rows,)](_t(a), _t(b), _t(scale), _t(bias), s_out, y, _dims(0, 0), 1, rows, N=n, ADD=int(add),
                             LAYER=int(layer), HAS_BIAS=int(layer), EPS=1e-5, SEQ_ROWS=1, ROWS_MUL=1, BLOCK=64,
                             RESIDUAL=int(residual))
    assert rel_err(y.numpy(), want) < 1e-5
    if add:
        assert np.abs(s_out.numpy() - s).max() < 1e-6


@pytest.mark.parametrize("batch,seq,vocab", [(1, 1, 1000), (3, 4, 257)])
def test_argmax(batch, seq, vocab, rng):
    logits = rng.standard_normal((batch, seq, vocab)).astype(np.float32)
    logits[0, -1, [5, 77]] = logits.max() + 1  # a tie: the first index wins, as numpy's
    tokens = torch.zeros(batch, dtype=torch.int32)
    K["sample"].argmax[(batch,)](_t(logits), tokens, _dims(0, 0), batch, seq, VOCAB=vocab, BLOCK=128)
    assert tokens.tolist() == logits[:, -1].argmax(-1).tolist()
