"""The pattern engine and the recognition rules on small hand-built graphs: the exact graph a
rewrite leaves (golden), and near misses that must stay unfused, stay correct, and say why."""

from __future__ import annotations

import numpy as np
import pytest

import llmc
from llmc.ir import DType, Graph, Sym, TensorType
from llmc.passes.manager import PassContext, run_passes
from llmc.passes.recognize_activations import recognize_activations
from llmc.passes.recognize_attention import recognize_attention
from llmc.passes.recognize_norms import recognize_norms

batch, seq = Sym.var("batch"), Sym.var("seq")
HIDDEN = 8


def _graph():
    g = Graph("t")
    return g, g.add_input("x", TensorType((batch, seq, HIDDEN), DType.f32))


def _run(g, p, rng):
    env = {"batch": 2, "seq": 3}
    feeds = {v.name: rng.standard_normal(v.type.concrete(env)).astype(np.float32) for v in g.inputs}
    want = llmc.run_reference(g, feeds)
    ctx = PassContext(debug=True)
    g = run_passes(g, [p], ctx)
    got = llmc.run_reference(g, feeds, check_types=True)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    return g, ctx.reports[-1]


def _rms_graph(rng, eps=1e-6, weight_const=True, axes=(-1,)):
    g, x = _graph()
    two = g.add_param("two", np.array(2.0, np.float32))
    (p,) = g.add_node("pow", [x, two])
    (m,) = g.add_node("reduce_mean", [p], {"axes": axes, "keepdims": 1})
    (a,) = g.add_node("add", [m, g.add_param("eps", np.array(eps, np.float32))])
    (s,) = g.add_node("sqrt", [a])
    (r,) = g.add_node("reciprocal", [s])
    (n,) = g.add_node("mul", [r, x])  # operands swapped: commutativity
    w = (g.add_param("w", rng.standard_normal(HIDDEN).astype(np.float32)) if weight_const
         else g.add_input("w", TensorType((HIDDEN,), DType.f32)))
    (y,) = g.add_node("mul", [w, n], output_names=["y"])
    g.outputs.append(y)
    return g


def test_rms_norm_golden(rng):
    g, report = _run(_rms_graph(rng), recognize_norms, rng)
    assert [(n.op, [v.name for v in n.inputs]) for n in g.nodes] == [("rms_norm", ["x", "w"])]
    assert g.nodes[0].attrs["epsilon"] == pytest.approx(1e-6)
    assert g.outputs[0].name == "y" and report.rewrites["rms_norm"] == 1


@pytest.mark.parametrize("variant,reason", [
    (dict(eps=0.5), "epsilon"),
    (dict(weight_const=False), "w is not a constant"),
    (dict(axes=(1,)), "axes=(1,)"),
])
def test_rms_norm_near_misses(rng, variant, reason):
    g = _rms_graph(rng, **variant)
    g, report = _run(g, recognize_norms, rng)
    assert "rms_norm" not in [n.op for n in g.nodes]
    assert any(reason in m.reason for m in report.near_misses), report.near_misses


def test_silu_needs_the_same_value_twice(rng):
    g, x = _graph()
    (s,) = g.add_node("sigmoid", [x])
    (y,) = g.add_node("mul", [s, x], output_names=["y"])
    (z,) = g.add_node("relu", [x])
    (w,) = g.add_node("mul", [z, g.add_node("sigmoid", [x])[0]], output_names=["w"])
    g.outputs += [y, w]
    g, report = _run(g, recognize_activations, rng)
    assert report.rewrites["silu"] == 1
    assert sorted(n.op for n in g.nodes) == ["mul", "relu", "sigmoid", "silu"]


def test_shared_intermediate_is_not_swallowed(rng):
    """A value the pattern would delete but someone else still reads stops the rewrite."""
    g, x = _graph()
    (s,) = g.add_node("sigmoid", [x])
    (y,) = g.add_node("mul", [x, s], output_names=["y"])
    g.outputs += [y, s]
    g, report = _run(g, recognize_activations, rng)
    assert report.rewrites["silu"] == 0 and "silu" not in [n.op for n in g.nodes]


def _sdpa_graph(rng, softmax_axis=-1):
    g = Graph("sdpa")
    q = g.add_input("q", TensorType((batch, 4, seq, 16), DType.f32))
    k = g.add_input("k", TensorType((batch, 4, seq, 16), DType.f32))
    v = g.add_input("v", TensorType((batch, 4, seq, 16), DType.f32))
    (kt,) = g.add_node("transpose", [k], {"perm": (0, 1, 3, 2)})
    (s,) = g.add_node("matmul", [q, kt])
    (s2,) = g.add_node("mul", [s, g.add_param("scale", np.array(0.25, np.float32))])
    (p,) = g.add_node("softmax", [s2], {"axis": softmax_axis})
    (y,) = g.add_node("matmul", [p, v], output_names=["y"])
    g.outputs.append(y)
    return g


def _sdpa_feeds(rng):
    return {n: rng.standard_normal((2, 4, 5, 16)).astype(np.float32) for n in "qkv"}


def test_attention_golden(rng):
    g = _sdpa_graph(rng)
    feeds = _sdpa_feeds(rng)
    want = llmc.run_reference(g, feeds)["y"]
    g = run_passes(g, [recognize_attention], PassContext(debug=True))
    assert [n.op for n in g.nodes] == ["attention"]
    assert [v.name for v in g.nodes[0].inputs if v is not None] == ["q", "k", "v"]
    assert g.nodes[0].attrs["scale"] == pytest.approx(0.25)
    np.testing.assert_allclose(llmc.run_reference(g, feeds)["y"], want, rtol=1e-5, atol=1e-6)


def test_attention_softmax_over_wrong_axis_is_left_alone(rng):
    g = _sdpa_graph(rng, softmax_axis=2)
    feeds = _sdpa_feeds(rng)
    want = llmc.run_reference(g, feeds)["y"]
    ctx = PassContext(debug=True)
    g = run_passes(g, [recognize_attention], ctx)
    assert "attention" not in [n.op for n in g.nodes]
    assert any("axis=2" in m.reason for m in ctx.reports[-1].near_misses)
    np.testing.assert_allclose(llmc.run_reference(g, feeds)["y"], want)


def _projections(rng, same_input=True, bias=(True, True, True), const_weights=True):
    """Three linears (q, k, v), reading one input or three."""
    g = Graph("qkv")
    xs = [g.add_input(f"x{i}", TensorType((batch, seq, HIDDEN), DType.f32)) for i in range(3)]
    outs = []
    for i, has_bias in enumerate(bias):
        w = g.add_param(f"w{i}", rng.standard_normal((4, HIDDEN)).astype(np.float32)) if const_weights \
            else g.add_input(f"w{i}", TensorType((4, HIDDEN), DType.f32))
        inputs = [xs[0] if same_input else xs[i], w]
        if has_bias:
            inputs.append(g.add_param(f"b{i}", rng.standard_normal(4).astype(np.float32)))
        outs += g.add_node("linear", inputs, output_names=[f"y{i}"])
    g.outputs += outs
    return g


def test_qkv_merge_golden(rng):
    from llmc.passes.fuse_qkv import fuse_qkv

    g, report = _run(_projections(rng), fuse_qkv, rng)
    assert [n.op for n in g.nodes] == ["linear", "split"]
    assert [v.name for v in g.outputs] == ["y0", "y1", "y2"] and g.nodes[1].outputs == g.outputs
    merged = next(n for n in g.nodes if n.op == "linear")
    assert g.const_value(merged.inputs[1]).shape == (12, HIDDEN)
    assert report.rewrites["merge 3 linears"] == 1


@pytest.mark.parametrize("variant,reason", [
    (dict(same_input=False), None),
    (dict(bias=(True, False, True)), "differ in having a bias"),
    (dict(const_weights=False), "not constant"),
])
def test_qkv_near_misses(rng, variant, reason):
    from llmc.passes.fuse_qkv import fuse_qkv

    g, report = _run(_projections(rng, **variant), fuse_qkv, rng)
    assert [n.op for n in g.nodes].count("linear") == 3 and not report.rewrites
    if reason:
        assert any(reason in m.reason for m in report.near_misses), report.near_misses


def _gated_mlp(rng, act="gelu", axis=-1, sizes=(6, 6)):
    """sizes None: two equal parts by `num_outputs` alone (ONNX Split-18)."""
    g, x = _graph()
    parts = sizes or (6, 6)
    w = g.add_param("w", rng.standard_normal((sum(parts), HIDDEN)).astype(np.float32))
    (y,) = g.add_node("linear", [x, w])
    gate, up, *_ = g.add_node("split", [y], {"axis": axis, "sizes": sizes, "num_outputs": len(parts)})
    (a,) = g.add_node(act, [gate])
    (out,) = g.add_node("mul", [a, up], output_names=["out"])
    g.outputs.append(out)
    return g


@pytest.mark.parametrize("act,axis,sizes", [
    ("gelu", -1, (6, 6)),
    ("silu", 2, None),  # Phi-3's gate_up as the dynamo exporter writes it: Split(axis=2, num_outputs=2)
])
def test_gated_epilogue_golden(act, axis, sizes, rng):
    """linear -> halves -> act(gate) * up becomes one GEMM with a gated epilogue."""
    from llmc.passes.fuse_linear import fuse_linear

    g, report = _run(_gated_mlp(rng, act, axis, sizes), fuse_linear, rng)
    assert [n.op for n in g.nodes] == ["fused_linear"]
    assert g.nodes[0].attrs["gated"] == 1 and g.nodes[0].attrs["activation"] == act
    assert report.rewrites[f"gated_{act}"] == 1


def test_gated_epilogue_near_miss_three_parts(rng):
    from llmc.passes.fuse_linear import fuse_linear

    g, report = _run(_gated_mlp(rng, "silu", -1, (4, 4, 4)), fuse_linear, rng)
    assert "gated_silu" not in report.rewrites
    assert any("does not cut the GEMM output into two equal halves" in m.reason for m in report.near_misses)


def test_add_norm_golden(rng):
    """A residual add read by a norm and by the next residual: one op, two outputs."""
    from llmc.passes.fuse_add_norm import fuse_add_norm

    g, x = _graph()
    r = g.add_input("r", TensorType((batch, seq, HIDDEN), DType.f32))
    (s,) = g.add_node("add", [x, r])
    (n,) = g.add_node("rms_norm", [s, g.add_param("g", rng.standard_normal(HIDDEN).astype(np.float32))],
                      {"epsilon": 1e-5})
    (y,) = g.add_node("add", [n, s], output_names=["y"])
    g.outputs.append(y)
    g, report = _run(g, fuse_add_norm, rng)
    assert [n.op for n in g.nodes] == ["add_norm", "add"]
    assert g.nodes[1].inputs == [g.nodes[0].outputs[1], g.nodes[0].outputs[0]]
    assert report.rewrites["add_rms_norm"] == 1
