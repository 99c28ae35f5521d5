"""One pass at a time on small hand-built graphs, as MLC's and Inductor's pass tests read: the
graph in, the graph the pass must leave (its ops and their inputs), and a near miss it must
leave alone. Every rewrite keeps the reference semantics on random inputs (seed printed on
failure). The recognitions and fusions with patterns of their own are in test_patterns.py;
this file covers the passes no other test names."""

from __future__ import annotations

import numpy as np
import pytest

import llmc
from llmc.ir import DType, Graph, Sym, TensorType
from llmc.options import CompileOptions
from llmc.passes.canonicalize import canonicalize
from llmc.passes.cse import cse
from llmc.passes.dce import dce
from llmc.passes.fold_constants import fold_constants
from llmc.passes.fold_shapes import fold_shapes
from llmc.passes.fuse_attention_io import fuse_attention_io
from llmc.passes.half_weights import half_weights
from llmc.passes.manager import PassContext, run_passes
from llmc.passes.quantize_activations import quantize_activations
from llmc.passes.quantize_weights import quantize
from llmc.passes.recognize_rotary import recognize_rotary
from llmc.passes.specialize_context import specialize_context

batch, seq, past = Sym.var("batch"), Sym.var("seq"), Sym.var("past")
ENV = {"batch": 2, "seq": 3, "past": 4}
F32 = DType.f32


def _f32(g, name, shape):
    return g.add_input(name, TensorType(shape, F32))


def _const(g, name, values, dtype=np.int64):
    return g.add_param(name, np.array(values, dtype))


def _feeds(g, rng):
    return {v.name: rng.standard_normal(v.type.concrete(ENV)).astype(np.float32) for v in g.inputs}


def _run(g, p, rng, options=None):
    """`g` after pass `p` alone, its outputs checked against `g`'s before; and the pass's report."""
    feeds = _feeds(g, rng)
    want = llmc.run_reference(g, feeds)
    ctx = PassContext(debug=True, options=options or CompileOptions(max_seq_len=None))
    g = run_passes(g, [p], ctx)
    got = llmc.run_reference(g, feeds, check_types=True)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    return g, ctx.reports[-1]


def _ops(g) -> list[tuple[str, list[str]]]:
    """The graph as (op, input names) in order."""
    return [(n.op, [v.name if v is not None else "" for v in n.inputs]) for n in g.nodes]


# canonicalize ---------------------------------------------------------------------------------

def test_canonicalize_division_by_a_constant_is_a_product_with_its_inverse(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 8))
    (y,) = g.add_node("div", [x, g.add_param("c", np.array(4.0, np.float32))], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, canonicalize, rng)
    (node,) = g.nodes
    assert node.op == "mul" and node.inputs[0].name == "x" and float(g.const_value(node.inputs[1])) == 0.25
    assert report.rewrites["div_by_const"] == 1


def test_canonicalize_matmul_by_a_2d_constant_is_a_linear_and_takes_its_bias(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, seq, 8))
    w = rng.standard_normal((8, 6)).astype(np.float32)
    (h,) = g.add_node("matmul", [x, g.add_param("w", w)])
    (y,) = g.add_node("add", [h, g.add_param("b", rng.standard_normal(6).astype(np.float32))], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, canonicalize, rng)
    assert [op for op, _ in _ops(g)] == ["linear"]
    np.testing.assert_array_equal(g.const_value(g.nodes[0].inputs[1]), w.T)  # [out, in], transposed once
    assert report.rewrites["matmul_to_linear"] == 1 and report.rewrites["linear_bias"] == 1


@pytest.mark.parametrize("restored", [True, False])
def test_canonicalize_makes_a_bmm_between_reshapes_one_batched_matmul(restored, rng):
    """torch's 4-D matmul: [b, h, s, d] @ [b, h, d, t] as bmm over [b*h, ...] between reshapes;
    a near miss when the output is not restored to [b, h, s, t]."""
    g = Graph("t")
    a, b = _f32(g, "a", (2, 3, 5, 4)), _f32(g, "b", (2, 3, 4, 6))
    flat_a, flat_b = (g.add_node("reshape", [x, _const(g, f"s{n}", [6, *x.shape[2:]])])[0] for n, x in ((0, a), (1, b)))
    (p,) = g.add_node("matmul", [flat_a, flat_b])
    (y,) = g.add_node("reshape", [p, _const(g, "s2", [2, 3, 5, 6] if restored else [3, 2, 5, 6])], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, canonicalize, rng)
    assert ([op for op, _ in _ops(g)] == ["matmul"]) == restored
    assert restored or any("restore the batch dims" in m.reason for m in report.near_misses)


def test_canonicalize_leaves_integer_division_and_a_bias_that_does_not_fit(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 8))
    w = rng.standard_normal((8, 6)).astype(np.float32)
    (h,) = g.add_node("matmul", [x, g.add_param("w", w)])
    (y,) = g.add_node("add", [h, g.add_param("b", rng.standard_normal((1, 6)).astype(np.float32))],
                      output_names=["y"])
    (n,) = g.add_node("div", [_const(g, "nine", [6, 9]), _const(g, "two", 2)], output_names=["n"])
    g.outputs += [y, n]
    g, report = _run(g, canonicalize, rng)
    assert sorted(op for op, _ in _ops(g)) == ["add", "div", "linear"]
    assert report.rewrites == {"matmul_to_linear": 1}  # the [1, 6] bias broadcasts: not the linear's


# cse and dce ----------------------------------------------------------------------------------

def test_cse_computes_equal_nodes_once_and_merges_equal_small_constants(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 8))
    (a,) = g.add_node("mul", [x, g.add_param("c1", np.array(2.0, np.float32))])
    (b,) = g.add_node("mul", [x, g.add_param("c2", np.array(2.0, np.float32))])  # the same, once c2 is c1
    (y,) = g.add_node("add", [a, b], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, cse, rng)
    assert _ops(g) == [("mul", ["x", "c1"]), ("add", ["mul", "mul"])]
    assert report.rewrites == {"param": 1, "mul": 1}


def test_cse_keeps_nodes_whose_attributes_differ(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 2, 4))
    (a,) = g.add_node("transpose", [x], {"perm": (0, 2, 1)})
    (b,) = g.add_node("transpose", [x], {"perm": (1, 0, 2)})
    g.outputs += [a, b]
    g, report = _run(g, cse, rng)
    assert len(g.nodes) == 2 and not report.rewrites


def test_dce_removes_what_no_output_reads_and_keeps_the_rest(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 8))
    (used,) = g.add_node("neg", [x], output_names=["y"])
    (dead,) = g.add_node("mul", [x, g.add_param("unused", np.ones(8, np.float32))])
    g.add_node("relu", [dead])
    g.outputs.append(used)
    g, report = _run(g, dce, rng)
    assert _ops(g) == [("neg", ["x"])] and "unused" not in g.params
    assert report.rewrites["removed"] >= 2


# fold_constants -------------------------------------------------------------------------------

def test_fold_constants_evaluates_nodes_of_constants_once(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 6))
    w = rng.standard_normal((6, 4)).astype(np.float32)
    (wt,) = g.add_node("transpose", [g.add_param("w", w)], {"perm": (1, 0)})  # an exporter's weight transpose
    (y,) = g.add_node("matmul", [x, g.add_node("transpose", [wt], {"perm": (1, 0)})[0]], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, fold_constants, rng)
    assert [op for op, _ in _ops(g)] == ["matmul"] and g.nodes[0].inputs[1].kind == "param"
    np.testing.assert_array_equal(g.const_value(g.nodes[0].inputs[1]), w)
    assert report.rewrites["transpose"] == 2


def test_fold_constants_leaves_an_expansion_of_a_scalar_to_run_time(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 1000))
    (big,) = g.add_node("expand", [g.add_param("s", np.array(1.5, np.float32)), _const(g, "shape", [1000])])
    (y,) = g.add_node("mul", [x, big], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, fold_constants, rng)
    assert [op for op, _ in _ops(g)] == ["expand", "mul"] and not report.rewrites


# fold_shapes ----------------------------------------------------------------------------------

def test_fold_shapes_turns_shape_arithmetic_into_a_dims_node(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, seq, 8))
    (shape,) = g.add_node("shape", [x])
    (b,) = g.add_node("gather", [shape, _const(g, "i0", [0])])
    (s,) = g.add_node("gather", [shape, _const(g, "i1", [1])])
    (target,) = g.add_node("concat", [b, s, _const(g, "four", [2]), _const(g, "minus", [4])], {"axis": 0})
    (y,) = g.add_node("reshape", [x, target], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, fold_shapes, rng)
    assert [op for op, _ in _ops(g)] == ["dims", "reshape"]
    assert g.nodes[0].attrs["values"] == (batch, seq, 2, 4) and g.nodes[1].inputs[1] is g.nodes[0].outputs[0]
    assert report.rewrites["to dims"] >= 1


def test_fold_shapes_makes_static_shapes_constants_and_leaves_integers_it_cannot_know(rng):
    g = Graph("t")
    x = _f32(g, "x", (2, 3, 8))
    ids = g.add_input("ids", TensorType((batch,), DType.i64))
    (shape,) = g.add_node("shape", [x], {"start": 0, "end": 2})
    (flat,) = g.add_node("concat", [shape, _const(g, "rest", [8])], {"axis": 0})
    (y,) = g.add_node("reshape", [x, flat], output_names=["y"])
    (twice,) = g.add_node("add", [ids, ids], output_names=["twice"])  # a value, not a shape
    g.outputs += [y, twice]
    feeds = {"x": rng.standard_normal((2, 3, 8)).astype(np.float32), "ids": np.arange(2)}
    want = llmc.run_reference(g, feeds)
    ctx = PassContext(debug=True)
    g = run_passes(g, [fold_shapes], ctx)
    assert [op for op, _ in _ops(g)] == ["reshape", "add"] and g.nodes[0].inputs[1].kind == "param"
    assert ctx.reports[-1].rewrites["to constant"] >= 1 and not ctx.reports[-1].rewrites["to dims"]
    got = llmc.run_reference(g, feeds)
    assert all(np.array_equal(got[k], want[k]) for k in want)


# recognize_rotary -----------------------------------------------------------------------------

def _rotate_half_graph(rng, second_start=4, dim=8):
    g = Graph("t")
    x = _f32(g, "x", (batch, 2, seq, dim))
    cos, sin = _f32(g, "cos", (1, 1, seq, dim)), _f32(g, "sin", (1, 1, seq, dim))

    def half(start, end):
        return g.add_node("slice", [x, _const(g, "s", [start]), _const(g, "e", [end]), _const(g, "a", [-1]),
                                    _const(g, "p", [1])])[0]
    (neg,) = g.add_node("neg", [half(second_start, dim)])
    (rotated,) = g.add_node("concat", [neg, half(0, second_start)], {"axis": -1})
    (a,) = g.add_node("mul", [x, cos])
    (b,) = g.add_node("mul", [rotated, sin])
    (y,) = g.add_node("add", [a, b], output_names=["y"])
    g.outputs.append(y)
    return g


def test_recognize_rotary_finds_rotate_half(rng):
    g, report = _run(_rotate_half_graph(rng), recognize_rotary, rng)
    assert _ops(g) == [("rotary", ["x", "cos", "sin"])] and report.rewrites["rotary"] == 1


def test_recognize_rotary_leaves_halves_cut_elsewhere(rng):
    g, report = _run(_rotate_half_graph(rng, second_start=2, dim=8), recognize_rotary, rng)
    assert "rotary" not in [op for op, _ in _ops(g)]
    assert any("not the two halves" in m.reason or "not 0 and 4" in m.reason for m in report.near_misses)


# fuse_attention_io ----------------------------------------------------------------------------

HEADS, HEAD_DIM = 2, 4


def _attention_graph(rng, merged_width=HEADS * HEAD_DIM, qk_norm="", k_eps=1e-6):
    """q, k, v [batch, seq, heads*dim] split into heads, q and k RMS-normalized (qk_norm "all":
    before the split, "head": after it, "head_t": after the transpose) and rotated, the cache
    appended, attention, the heads merged back: what the KV cache pass leaves around attention."""
    g = Graph("t")
    q, k, v = (_f32(g, n, (batch, seq, HEADS * HEAD_DIM)) for n in "qkv")
    cos, sin = _f32(g, "cos", (batch, 1, seq, HEAD_DIM)), _f32(g, "sin", (batch, 1, seq, HEAD_DIM))
    past_k, past_v = (_f32(g, n, (batch, HEADS, past, HEAD_DIM)) for n in ("past_k", "past_v"))
    split = g.add_node("dims", [], {"values": (batch, seq, HEADS, HEAD_DIM)})[0]

    def normed(x, name, eps=1e-6):
        width = HEADS * HEAD_DIM if qk_norm == "all" else HEAD_DIM
        w = g.add_param(f"{name}_norm", (1 + 0.3 * rng.standard_normal(width)).astype(np.float32))
        return g.add_node("rms_norm", [x, w], {"epsilon": eps})[0]

    def heads(x, name=""):
        x = normed(x, name, k_eps if name == "k" else 1e-6) if name and qk_norm == "all" else x
        x = g.add_node("reshape", [x, split])[0]
        x = normed(x, name, k_eps if name == "k" else 1e-6) if name and qk_norm == "head" else x
        x = g.add_node("transpose", [x], {"perm": (0, 2, 1, 3)})[0]
        return normed(x, name, k_eps if name == "k" else 1e-6) if name and qk_norm == "head_t" else x
    (qr,) = g.add_node("rotary", [heads(q, "q" * bool(qk_norm)), cos, sin])
    (kr,) = g.add_node("rotary", [heads(k, "k" * bool(qk_norm)), cos, sin])
    (kc,) = g.add_node("kv_append", [past_k, kr], output_names=["present_k"])
    (vc,) = g.add_node("kv_append", [past_v, heads(v)], output_names=["present_v"])
    (o,) = g.add_node("attention", [qr, kc, vc])
    merge = g.add_node("dims", [], {"values": (batch, seq, merged_width)})[0]
    (t,) = g.add_node("transpose", [o], {"perm": (0, 2, 1, 3)})
    (y,) = g.add_node("reshape", [t, merge], output_names=["y"])
    g.outputs += [y, kc, vc]
    return g


def test_fuse_attention_io_makes_rope_cache_and_attention_with_merged_heads(rng):
    g, report = _run(_attention_graph(rng), fuse_attention_io, rng)
    assert [op for op, _ in _ops(g)] == ["rope_cache", "attention"]
    rope, attn = g.nodes
    assert [v.name for v in rope.inputs[:7]] == ["q", "k", "v", "cos", "sin", "past_k", "past_v"]
    assert rope.attrs["heads"] == HEADS and rope.attrs["kv_heads"] == HEADS
    assert attn.attrs["merge_heads"] == 1 and attn.outputs[0] is g.outputs[0]
    assert report.rewrites == {"rope_cache": 1, "merge_heads": 1}


@pytest.mark.parametrize("qk_norm", ["head", "head_t", "all"])
def test_fuse_attention_io_takes_the_qk_norms_into_rope_cache(qk_norm, rng):
    g, report = _run(_attention_graph(rng, qk_norm=qk_norm), fuse_attention_io, rng)
    assert [op for op, _ in _ops(g)] == ["rope_cache", "attention"]
    rope = g.nodes[0]
    assert [v.name for v in rope.inputs[8:]] == ["q_norm", "k_norm"]
    assert rope.attrs["qk_norm"] == ("all" if qk_norm == "all" else "head") and rope.attrs["norm_epsilon"] == 1e-6


def test_fuse_attention_io_leaves_qk_norms_of_different_epsilons(rng):
    g, report = _run(_attention_graph(rng, qk_norm="head", k_eps=1e-5), fuse_attention_io, rng)
    assert "rope_cache" not in [op for op, _ in _ops(g)]
    assert any("different epsilons" in m.reason for m in report.near_misses)


def test_fuse_attention_io_leaves_a_reshape_that_does_not_merge_the_heads(rng):
    g = _attention_graph(rng)
    # [batch, seq, heads, dim] viewed as [batch, seq * heads, dim]: not the merged heads
    out = g.nodes[-1]
    g.nodes[-2].outputs[0]  # the transpose stays as the pattern's inner op
    target = g.add_node("dims", [], {"values": (batch, seq * HEADS, HEAD_DIM)})[0]
    (y,) = g.add_node("reshape", [out.inputs[0], target], output_names=["y2"])
    g.outputs[0] = y
    g.remove_dead()
    g.toposort()
    g, report = _run(g, fuse_attention_io, rng)
    assert "rope_cache" in [op for op, _ in _ops(g)]
    assert [n.attrs["merge_heads"] for n in g.nodes if n.op == "attention"] == [0]
    assert any("does not merge the heads" in m.reason for m in report.near_misses)


# fuse_add_norm (post-norm) --------------------------------------------------------------------

@pytest.mark.parametrize("broadcast", [False, True])
def test_fuse_add_norm_takes_a_residual_plus_a_norm_into_norm_add(broadcast, rng):
    """OLMo 2 and Gemma's post-norm, residual + rms_norm(x), is one norm_add; a residual that
    broadcasts is left alone, saying so."""
    from llmc.passes.fuse_add_norm import fuse_add_norm

    g = Graph("t")
    x = _f32(g, "x", (batch, seq, 8))
    residual = _f32(g, "residual", (1, 1, 8) if broadcast else (batch, seq, 8))
    w = g.add_param("w", (1 + 0.3 * rng.standard_normal(8)).astype(np.float32))
    (n,) = g.add_node("rms_norm", [x, w], {"epsilon": 1e-6})
    (y,) = g.add_node("add", [residual, n], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, fuse_add_norm, rng)
    if broadcast:
        assert [op for op, _ in _ops(g)] == ["rms_norm", "add"]
        assert any("broadcasts" in m.reason for m in report.near_misses)
    else:
        assert _ops(g) == [("norm_add", ["residual", "x", "w"])] and g.nodes[0].attrs["epsilon"] == 1e-6


# specialize_context ---------------------------------------------------------------------------

def _window_graph():
    """Mistral's sliding window: the cache read through past[-4095:]."""
    g = Graph("t")
    cache = _f32(g, "cache", (batch, 2, past, 4))
    (y,) = g.add_node("slice", [cache, _const(g, "s", [-4095]), _const(g, "e", [2**62]), _const(g, "a", [2]),
                                _const(g, "p", [1])], output_names=["y"])
    (z,) = g.add_node("neg", [y], output_names=["z"])
    g.outputs.append(z)
    return g


def test_specialize_context_drops_a_window_longer_than_the_context(rng):
    g, report = _run(_window_graph(), specialize_context, rng, CompileOptions(max_seq_len=1024))
    assert _ops(g) == [("neg", ["cache"])] and g.metadata["max_seq_len"] == 1024
    assert report.rewrites["identity slice"] == 1


def test_specialize_context_keeps_a_window_shorter_than_the_context(rng):
    g, report = _run(_window_graph(), specialize_context, rng, CompileOptions(max_seq_len=8192))
    assert [op for op, _ in _ops(g)] == ["slice", "neg"] and not report.rewrites


def _appended_window_graph(window):
    """Gemma's sliding-window layer: the cache appended, then its last `window` positions kept."""
    g = Graph("t")
    cache, new = _f32(g, "cache", (batch, 2, past, 4)), _f32(g, "new", (batch, 2, seq, 4))
    (cat,) = g.add_node("concat", [cache, new], {"axis": 2})
    (y,) = g.add_node("slice", [cat, _const(g, "s", [-window]), _const(g, "e", [2**62]), _const(g, "a", [2]),
                                _const(g, "p", [1])], output_names=["y"])
    g.outputs.append(y)
    return g


@pytest.mark.parametrize("window,context,kept", [(1023, 1023, False), (1023, 1024, True)])
def test_specialize_context_bounds_past_plus_seq_by_the_context(window, context, kept, rng):
    """min(past + seq, 1023) is past + seq for a context of 1023 (each of past and seq alone could
    be 1023: only their sum's bound decides it)."""
    g, _ = _run(_appended_window_graph(window), specialize_context, rng, CompileOptions(max_seq_len=context))
    assert ("slice" in [op for op, _ in _ops(g)]) == kept


# kv_cache -------------------------------------------------------------------------------------

def test_kv_cache_records_an_appended_cache_and_the_backend_refuses_one_it_cut(rng):
    from llmc.backends.cache_layout import lay_out_caches
    from llmc.backends.plan import UnsupportedGraph
    from llmc.passes.kv_cache import kv_cache

    g = Graph("t")
    cache, new = _f32(g, "cache", (batch, 2, past, 4)), _f32(g, "new", (batch, 2, seq, 4))
    (y,) = g.add_node("concat", [cache, new], {"axis": 2}, output_names=["present"])
    g.outputs.append(y)
    g, _ = _run(g, kv_cache, rng)
    assert _ops(g) == [("kv_append", ["cache", "new"])]
    assert g.metadata["kv_cache"]["entries"] == [{"past": "cache", "present": "present"}]
    # a window shorter than the context: the runtime would feed that past empty, so the backend
    # refuses the graph (the pass leaves it as it is: a pass keeps meaning, it does not judge)
    cut, _ = _run(_appended_window_graph(7), kv_cache, rng)
    cut.metadata["roles"] = {"tokens": "ids"}  # an imported decoder's
    with pytest.raises(UnsupportedGraph, match="cache: the layer's cache is not written whole"):
        lay_out_caches(cut, "f32")


# half_weights and quantize_activations ----------------------------------------------------------

def _gemm_graph(rng, quant="", features=64):
    g = Graph("t")
    x = _f32(g, "x", (batch, features))
    w = rng.standard_normal((16, features)).astype(np.float32)
    if quant:
        q, scale, _ = quantize(w, quant)
        inputs = [x, g.add_param("w", q), None, None, None, None, g.add_param("w.scale", scale)]
    else:
        inputs = [x, g.add_param("w", w)]
    (h,) = g.add_node("fused_linear", inputs, {"quant": quant})
    (y,) = g.add_node("relu", [h], output_names=["y"])  # the GEMM is not the LM head
    g.outputs.append(y)
    return g


def test_half_weights_stores_f32_gemm_weights_in_f16(rng):
    g = Graph("t")
    x = _f32(g, "x", (batch, 8))
    w = rng.standard_normal((4, 8)).astype(np.float32)
    (y,) = g.add_node("fused_linear", [x, g.add_param("w", w)], output_names=["y"])
    g.outputs.append(y)
    ctx = PassContext(debug=True, options=CompileOptions(target="cuda", dtype="fp16", max_seq_len=None))
    g = run_passes(g, [half_weights], ctx)
    stored = g.const_value(g.nodes[0].inputs[1])
    assert stored.dtype == np.float16 and np.array_equal(stored, w.astype(np.float16))
    assert ctx.reports[-1].rewrites["half_weights"] == 1


def test_half_weights_leaves_quantized_weights_and_fp32_compiles_alone(rng):
    ctx = PassContext(debug=True, options=CompileOptions(target="cuda", dtype="fp16", max_seq_len=None))
    g = run_passes(_gemm_graph(rng, "w8"), [half_weights], ctx)
    assert g.const_value(g.nodes[0].inputs[1]).dtype == np.int8 and not ctx.reports[-1].rewrites
    g, report = _run(_gemm_graph(rng), half_weights, rng)  # default options: fp32
    assert g.const_value(g.nodes[0].inputs[1]).dtype == np.float32 and not report.rewrites


def test_quantize_activations_gives_quantized_gemms_int8_blocks(rng):
    options = CompileOptions(activations="int8", max_seq_len=None)
    ctx = PassContext(debug=True, options=options)
    g = run_passes(_gemm_graph(rng, "w8"), [quantize_activations], ctx)
    assert g.nodes[0].attrs["act_block"] == 32 and ctx.reports[-1].rewrites["int8_activations"] == 1


@pytest.mark.parametrize("quant,features", [("", 64), ("w8", 48)])  # f32 weights; not whole blocks of 32
def test_quantize_activations_leaves_gemms_it_cannot_block(rng, quant, features):
    ctx = PassContext(debug=True, options=CompileOptions(activations="int8", max_seq_len=None))
    g = run_passes(_gemm_graph(rng, quant, features), [quantize_activations], ctx)
    assert g.nodes[0].attrs["act_block"] == 0 and not ctx.reports[-1].rewrites
