"""The TVM rope_cache kernel against the op's numpy definition: full, partial and no rotary,
GQA, q/k norms per head and over the whole projection, prefill into an empty cache and decode
steps after a past, written in place into the runtime's [batch, kv_heads, max_seq, head_dim]
caches (or [batch, max_seq, kv_heads, head_dim]) without touching other rows."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import block_table, from_pages, in_kv_order, rel_err, to_pages
from zoo_cases import export

import llmc
from llmc.backends.tvm.rope_cache import RopeCacheSpec, build
from llmc.backends.tvm.target import host
from llmc.ops import get_op

MAX_SEQ = 16


def _tables(spec, rng, batch, seq):
    """cos, sin [batch, seq, rotary_dim], and the kernel's arguments for them: none without rotation."""
    cos, sin = (rng.standard_normal((batch, seq, max(spec.rotary_dim, 2))).astype(np.float32) for _ in range(2))
    return cos, sin, [cos, sin] if spec.rotary_dim else []


def _check(spec, rng, batch, seq, past, table_batch=None):
    kernel = build(spec, host())["main"]
    d = spec.head_dim
    qkv = rng.standard_normal((batch, seq, (spec.heads + 2 * spec.kv_heads) * d)).astype(np.float32)
    cos, sin, tables = _tables(spec, rng, table_batch or batch, seq)
    norms = [(1 + 0.5 * rng.standard_normal(spec.norm_width(h))).astype(np.float32) for h in (spec.heads, spec.kv_heads)]
    caches = [rng.standard_normal((batch, spec.kv_heads, MAX_SEQ, d)).astype(np.float32) for _ in range(2)]
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in (qkv, *tables, *norms * bool(spec.qk_norm),
                                                 *(in_kv_order(c, spec.order) for c in caches))]
    q = tvm.runtime.tensor(np.zeros((batch, spec.heads, seq, d), np.float32), dev)
    kernel(*args, q, past)
    cos, sin = (np.broadcast_to(t, (batch, *t.shape[1:])) for t in (cos, sin))

    qp, kp, vp = np.split(qkv, [spec.heads * d, (spec.heads + spec.kv_heads) * d], axis=-1)
    rotary = spec.rotary_dim > 0
    want = get_op("rope_cache").ref(qp, kp, vp, cos[:, None] if rotary else None, sin[:, None] if rotary else None,
                                    caches[0][:, :, :past], caches[1][:, :, :past], None,
                                    *(norms if spec.qk_norm else [None, None]), heads=spec.heads,
                                    kv_heads=spec.kv_heads, rotary_dim=spec.rotary_dim % d, qk_norm=spec.qk_norm,
                                    norm_epsilon=spec.norm_epsilon)
    assert rel_err(q.numpy(), want[0]) < 2e-6
    for got, before, w in zip((in_kv_order(a.numpy(), spec.order) for a in args[-2:]), caches, want[1:]):
        assert rel_err(got[:, :, :past + seq], w) < 2e-6
        np.testing.assert_array_equal(got[:, :, past + seq:], before[:, :, past + seq:])


@pytest.mark.parametrize("spec", [RopeCacheSpec(4, 2, 16, 16), RopeCacheSpec(4, 4, 12, 4),
                                  RopeCacheSpec(3, 3, 10, 0), RopeCacheSpec(4, 2, 16, 16, order="bshd"),
                                  RopeCacheSpec(4, 2, 24, 24, qk_norm="head", norm_epsilon=1e-6),
                                  RopeCacheSpec(6, 2, 10, 10, qk_norm="all", norm_epsilon=1e-5)],
                         ids=["gqa-full", "partial", "none", "gqa-bshd", "qk-norm-head", "qk-norm-all"])
@pytest.mark.parametrize("batch,seq,past", [(2, 5, 0), (1, 1, 7), (2, 3, 4)], ids=["prefill", "decode", "chunk"])
def test_kernel_matches_reference(spec, batch, seq, past, rng):
    _check(spec, rng, batch, seq, past)


def test_tables_of_one_sequence_serve_a_batch(rng):
    """Tables computed once for positions [1, seq] (as transformers does) rotate every sequence."""
    _check(RopeCacheSpec(4, 2, 16, 16), rng, batch=3, seq=4, past=2, table_batch=1)


def test_specs_of_compiled_models():
    from llmc.passes.manager import PassContext, run_passes
    from llmc.options import CompileOptions
    from llmc.passes.pipeline import default_pipeline

    specs = {}
    for name in ("llama-tiny", "gpt2-tiny", "phi-tiny"):
        graph = llmc.from_onnx(export(name, exporter="dynamo", kv_cache=True))
        graph = run_passes(graph, default_pipeline(), PassContext(options=CompileOptions(max_seq_len=128)))
        specs[name] = {RopeCacheSpec.of(n) for n in graph.nodes if n.op == "rope_cache"}
    assert specs == {"llama-tiny": {RopeCacheSpec(4, 2, 16, 16)}, "gpt2-tiny": {RopeCacheSpec(4, 4, 16, 0)},
                     "phi-tiny": {RopeCacheSpec(4, 4, 16, 8)}}


def _written(spec, qkv, cos, sin):
    """The op's q and the rows it writes into empty caches: (q, k, v)."""
    d = spec.head_dim
    qp, kp, vp = np.split(qkv, [spec.heads * d, (spec.heads + spec.kv_heads) * d], axis=-1)
    rotary = spec.rotary_dim > 0
    empty = np.zeros((qkv.shape[0], spec.kv_heads, 0, d), np.float32)
    return get_op("rope_cache").ref(qp, kp, vp, cos[:, None] if rotary else None, sin[:, None] if rotary else None,
                                    empty, empty, heads=spec.heads, kv_heads=spec.kv_heads,
                                    rotary_dim=spec.rotary_dim % d)


@pytest.mark.parametrize("spec", [RopeCacheSpec(4, 2, 16, 16, kv_int8=True), RopeCacheSpec(3, 3, 10, 0, kv_int8=True)],
                         ids=["gqa-rotary", "none"])
def test_int8_cache_kernel_quantizes_rows(spec, rng):
    from llmc.backends.tvm.rope_cache import quantize_rows

    kernel = build(spec, host())["main"]
    batch, seq, past, d = 2, 3, 4, spec.head_dim
    qkv = rng.standard_normal((batch, seq, (spec.heads + 2 * spec.kv_heads) * d)).astype(np.float32)
    cos, sin, tables = _tables(spec, rng, batch, seq)
    caches = [rng.integers(-127, 128, (batch, spec.kv_heads, MAX_SEQ, d)).astype(np.int8) for _ in range(2)]
    scales = [rng.random((batch, spec.kv_heads, MAX_SEQ)).astype(np.float32) for _ in range(2)]
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in (qkv, *tables, *caches, *scales)]
    q = tvm.runtime.tensor(np.zeros((batch, spec.heads, seq, d), np.float32), dev)
    kernel(*args, q, past)

    want = _written(spec, qkv, cos, sin)
    assert rel_err(q.numpy(), want[0]) < 1e-6
    for i in range(2):
        values, scale = quantize_rows(want[1 + i])
        got_values, got_scales = args[-4 + i].numpy(), args[-2 + i].numpy()
        assert np.abs(got_values[:, :, past:past + seq].astype(int) - values).max() <= 1  # rounding at ties
        np.testing.assert_allclose(got_scales[:, :, past:past + seq], scale, rtol=1e-6)
        np.testing.assert_array_equal(got_values[:, :, :past], caches[i][:, :, :past])  # nothing else written
        np.testing.assert_array_equal(got_scales[:, :, past + seq:], scales[i][:, :, past + seq:])


@pytest.mark.parametrize("spec", [RopeCacheSpec(4, 2, 16, 16, page_tokens=4),
                                  RopeCacheSpec(3, 3, 10, 0, kv_int8=True, page_tokens=5)], ids=["gqa-f32", "int8"])
@pytest.mark.parametrize("seq", [1, 3])
def test_paged_kernel_writes_each_sequence_at_its_own_length(spec, seq, rng):
    """Two sequences of different lengths: each token lands in its own sequence's block at its
    own position, rotated (or quantized) as the op says; no other slot of the pool changes."""
    from llmc.backends.tvm.rope_cache import quantize_rows

    kernel = build(spec, host())["main"]
    batch, d, page, lengths = 2, spec.head_dim, spec.page_tokens, np.array([3, 9], np.int32)
    table, blocks = block_table(batch, MAX_SEQ, page, rng)
    qkv = rng.standard_normal((batch, seq, (spec.heads + 2 * spec.kv_heads) * d)).astype(np.float32)
    cos, sin, tables = _tables(spec, rng, batch, seq)
    if spec.kv_int8:
        caches = [rng.integers(-127, 128, (batch, spec.kv_heads, MAX_SEQ, d)).astype(np.int8) for _ in range(2)]
        caches += [rng.random((batch, spec.kv_heads, MAX_SEQ)).astype(np.float32) for _ in range(2)]
    else:
        caches = [rng.standard_normal((batch, spec.kv_heads, MAX_SEQ, d)).astype(np.float32) for _ in range(2)]
    pools = [to_pages(c, table, blocks, page) for c in caches]
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(a, dev) for a in (qkv, *tables, *pools, table, lengths)]
    q = tvm.runtime.tensor(np.zeros((batch, spec.heads, seq, d), np.float32), dev)
    kernel(*args, q)

    want = _written(spec, qkv, cos, sin)
    assert rel_err(q.numpy(), want[0]) < 1e-6
    got = [from_pages(a.numpy(), table, MAX_SEQ) for a in args[1 + len(tables):1 + len(tables) + len(pools)]]
    written = [want[1], want[2]] if not spec.kv_int8 else [*(r[0] for r in map(quantize_rows, want[1:])),
                                                           *(r[1] for r in map(quantize_rows, want[1:]))]
    for i, (g, before, w) in enumerate(zip(got, caches, written)):
        for b, n in enumerate(lengths):
            new = g[b, :, n:n + seq]
            if new.dtype == np.int8:
                assert np.abs(new.astype(int) - w[b]).max() <= 1  # rounding at ties
            else:
                np.testing.assert_allclose(new, w[b], rtol=1e-6, atol=1e-7, err_msg=f"cache {i}, sequence {b}")
            np.testing.assert_array_equal(np.delete(g[b], np.s_[n:n + seq], axis=1),
                                          np.delete(before[b], np.s_[n:n + seq], axis=1))
    spare = np.setdiff1d(np.arange(blocks), table)
    for pool, a in zip(pools, args[1 + len(tables):]):
        np.testing.assert_array_equal(a.numpy()[spare], pool[spare])
