"""The TVM attention kernel against the op's numpy definition: grouped-query heads, additive
masks with fully masked rows, causal alignment, merged or separate heads, odd head dims, one
build run at decode and prefill lengths (both of its paths), reading the first kv_len rows of max_seq-row caches."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import block_table, in_kv_order, rel_err, to_pages

from llmc.backends.tvm.attention import AttentionSpec, build
from llmc.backends.tvm.target import host
from llmc.ops import get_op

SPECS = [
    AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25),                       # Llama-style GQA
    AttentionSpec(heads=6, kv_heads=6, head_dim=13, scale=0.3, merge_heads=False),     # MHA, odd dim
    AttentionSpec(heads=4, kv_heads=1, head_dim=8, scale=0.5, masked=False, is_causal=True),  # MQA
    AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25, order="bshd"),         # GQA, seq-major cache
    AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25, softcap=0.7),          # Gemma 2's soft-capping
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"h{s.heads}kv{s.kv_heads}d{s.head_dim}"
                         f"{'-mask' * s.masked}{'-causal' * s.is_causal}{'-merged' * s.merge_heads}-{s.order}"
                         f"{'-softcap' * bool(s.softcap)}")
def test_kernel_matches_reference(spec, rng):
    kernel = build(spec, host())
    dev = tvm.cpu(0)
    # decode, prefill (in query tiles, the last one partial), a chunk below a tile, a chunk of
    # whole tiles past cached keys, a prefill over several vectors of keys
    for batch, seq, kv_len in ((1, 1, 9), (2, 7, 7), (1, 3, 11), (2, 4, 20), (1, 21, 37)):
        q = rng.standard_normal((batch, spec.heads, seq, spec.head_dim)).astype(np.float32)
        max_seq = kv_len + 5  # rows past kv_len must not be read
        caches = [rng.standard_normal((batch, spec.kv_heads, max_seq, spec.head_dim)).astype(np.float32)
                  for _ in range(2)]
        for c in caches:
            c[:, :, kv_len:] = np.nan  # any read past kv_len would poison the output
        k, v = (c[:, :, :kv_len] for c in caches)
        mask = np.where(rng.random((batch, 1, seq, kv_len)) > 0.3, 0, -np.inf).astype(np.float32)
        mask[:, :, 0, :] = -np.inf  # a query that sees no key: zeros, not NaN
        args = [q, *(in_kv_order(c, spec.order) for c in caches)] + [mask] * spec.masked
        want = get_op("attention").ref(q, k, v, mask if spec.masked else None, scale=spec.scale,
                                       is_causal=int(spec.is_causal), merge_heads=int(spec.merge_heads),
                                       softcap=spec.softcap)
        out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), dev)
        kernel["main"](*[tvm.runtime.tensor(a, dev) for a in args], out, *([] if spec.masked else [kv_len]))
        got = out.numpy()
        assert not np.isnan(got).any()
        assert rel_err(got, want) < 1e-5, (batch, seq, kv_len)


@pytest.mark.parametrize("spec", [AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25, kv_int8=True),
                                  AttentionSpec(heads=3, kv_heads=3, head_dim=13, scale=0.3, merge_heads=False,
                                                kv_int8=True),
                                  AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25, kv_int8=True,
                                                order="bshd")], ids=["gqa-int8", "mha-int8", "gqa-int8-bshd"])
def test_int8_cache_kernel_matches_reference_on_the_dequantized_cache(spec, rng):
    from llmc.backends.tvm.rope_cache import quantize_rows

    kernel = build(spec, host())
    dev = tvm.cpu(0)
    for batch, seq, kv_len in ((1, 1, 9), (2, 7, 7)):
        q = rng.standard_normal((batch, spec.heads, seq, spec.head_dim)).astype(np.float32)
        max_seq = kv_len + 5
        k, v = (rng.standard_normal((batch, spec.kv_heads, max_seq, spec.head_dim)).astype(np.float32)
                for _ in range(2))
        (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
        mask = np.where(rng.random((batch, 1, seq, kv_len)) > 0.3, 0, -np.inf).astype(np.float32)
        mask[:, :, :, 0] = 0
        dequantized = [(c * s[..., None])[:, :, :kv_len] for c, s in ((kq, ks), (vq, vs))]
        want = get_op("attention").ref(q, *dequantized, mask, scale=spec.scale, merge_heads=int(spec.merge_heads))
        out = tvm.runtime.tensor(np.zeros(want.shape, np.float32), dev)
        caches = (in_kv_order(c, spec.order) for c in (kq, vq, ks, vs))
        kernel["main"](*[tvm.runtime.tensor(a, dev) for a in (q, *caches, mask)], out)
        assert rel_err(out.numpy(), want) < 1e-5, (batch, seq, kv_len)
        # and the int8 cache is close to the f32 one
        full = get_op("attention").ref(q, k[:, :, :kv_len], v[:, :, :kv_len], mask, scale=spec.scale,
                                       merge_heads=int(spec.merge_heads))
        assert rel_err(out.numpy(), full) < 0.02


@pytest.mark.parametrize("spec", [AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25, page_tokens=4),
                                  AttentionSpec(heads=4, kv_heads=1, head_dim=8, scale=0.5, masked=False,
                                                is_causal=True, page_tokens=3),
                                  AttentionSpec(heads=3, kv_heads=3, head_dim=13, scale=0.3, merge_heads=False,
                                                kv_int8=True, page_tokens=5)], ids=["gqa-mask", "mqa-causal", "int8"])
@pytest.mark.parametrize("seq", [1, 3, 6])  # decode, a chunk, a chunk of query tiles
def test_paged_kernel_reads_each_sequence_to_its_own_length(spec, seq, rng):
    """Two sequences holding different lengths in one batch: each attends to its own blocks up
    to its own length (+ its causal position), as if alone; the slots past a sequence's length
    hold finite garbage the kernel must not weigh."""
    from llmc.backends.tvm.rope_cache import quantize_rows

    kernel = build(spec, host())
    dev, batch, page, max_seq, d = tvm.cpu(0), 2, spec.page_tokens, 17, spec.head_dim
    lengths = np.array([4, 10], np.int32)
    total = int(lengths.max()) + seq
    table, blocks = block_table(batch, max_seq, page, rng)
    q = rng.standard_normal((batch, spec.heads, seq, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, spec.kv_heads, max_seq, d)).astype(np.float32) for _ in range(2))
    for b, n in enumerate(lengths):
        k[b, :, n + seq:], v[b, :, n + seq:] = 1e3, -1e3
    if spec.kv_int8:
        (kq, ks), (vq, vs) = quantize_rows(k), quantize_rows(v)
        k, v = kq * ks[..., None], vq * vs[..., None]  # what the kernel reads back
        caches = (kq, vq, ks, vs)
    else:
        caches = (k, v)
    mask = np.where(rng.random((batch, 1, seq, total)) > 0.3, 0, -np.inf).astype(np.float32)
    mask[..., 0] = 0
    args = [q, *(to_pages(c, table, blocks, page) for c in caches)] + [mask] * spec.masked + [table, lengths]
    out_shape = (batch, seq, spec.heads * d) if spec.merge_heads else (batch, spec.heads, seq, d)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    kernel["main"](*[tvm.runtime.tensor(a, dev) for a in args], out, *([] if spec.masked else [total]))
    for b, n in enumerate(lengths):
        own = n + seq
        causal = np.where(np.arange(own)[None] <= n + np.arange(seq)[:, None], 0, -np.inf).astype(np.float32)
        m = causal + (mask[b:b + 1, :, :, :own] if spec.masked else 0)
        want = get_op("attention").ref(q[b:b + 1], k[b:b + 1, :, :own], v[b:b + 1, :, :own], m, scale=spec.scale,
                                       merge_heads=int(spec.merge_heads))
        assert rel_err(out.numpy()[b:b + 1], want) < 1e-5, (b, seq)


@pytest.mark.parametrize("seq", [1, 5])  # decode, prefill (both paths)
def test_a_sequence_gets_the_same_bits_in_any_batch(seq, rng):
    """A sequence's output is bit-for-bit what it is alone, whatever the batch's longest length
    (its kv_len): the serving engine's tokens must not depend on what else runs."""
    spec = AttentionSpec(heads=4, kv_heads=2, head_dim=16, scale=0.25)
    kernel, dev = build(spec, host()), tvm.cpu(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in
               ((2, 4, seq, 16), (2, 2, 64, 16), (2, 2, 64, 16)))

    def run(lengths, kv_len):  # sequence b sees its first lengths[b] keys
        mask = np.where(np.arange(kv_len) < np.array(lengths)[:, None], 0, -np.inf).astype(np.float32)
        mask = np.broadcast_to(mask[:, None, None, :], (len(lengths), 1, seq, kv_len)).copy()
        out = tvm.runtime.tensor(np.zeros((len(lengths), seq, 64), np.float32), dev)
        n = len(lengths)
        kernel["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a[:n]), dev) for a in (q, k, v)],
                       tvm.runtime.tensor(mask, dev), out)
        return out.numpy()
    alone = run([13], 13)
    for longest in (14, 16, 17, 33, 64):
        assert np.array_equal(run([13, longest], longest)[0], alone[0]), longest
