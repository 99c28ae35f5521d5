"""Building graphs by hand: typed construction, the verifier, the text form, networkx view."""

from __future__ import annotations

import numpy as np
import pytest

import llmc
from llmc.ir import DType, Graph, Sym, TensorType, VerificationError, verify
from llmc.ir.graph import Node, Value

batch, seq = Sym.var("batch"), Sym.var("seq")


def _mlp(rng):
    g = Graph("mlp")
    x = g.add_input("x", TensorType((batch, seq, 8), DType.f32))
    w = g.add_param("w", rng.standard_normal((8, 4)).astype(np.float32))
    b = g.add_param("b", rng.standard_normal(4).astype(np.float32))
    (h,) = g.add_node("matmul", [x, w])
    (y,) = g.add_node("add", [h, b])
    (z,) = g.add_node("gelu", [y], {"approximate": "tanh"}, output_names=["z"])
    g.outputs.append(z)
    return g, (x, w, b, h, y, z)


def test_types_are_inferred_on_construction(rng):
    g, (x, w, b, h, y, z) = _mlp(rng)
    assert h.type == TensorType((batch, seq, 4), DType.f32)
    assert z.name == "z" and z.type == h.type
    verify(g)


def test_shape_arithmetic_stays_symbolic(rng):
    """Reshape(x, Concat(Unsqueeze(Shape(x)[0] * Shape(x)[1]), [8])) is typed [batch*seq, 8]."""
    g = Graph()
    x = g.add_input("x", TensorType((batch, seq, 8), DType.f32))
    (s,) = g.add_node("shape", [x])
    (b,) = g.add_node("gather", [s, g.add_param("i0", np.array(0, np.int64))])
    (q,) = g.add_node("gather", [s, g.add_param("i1", np.array(1, np.int64))])
    (n,) = g.add_node("mul", [b, q])
    (u,) = g.add_node("unsqueeze", [n], {"axes": (0,)})
    (target,) = g.add_node("concat", [u, g.add_param("eight", np.array([8], np.int64))], {"axis": 0})
    (flat,) = g.add_node("reshape", [x, target])
    assert s.sym == (batch, seq, 8) and n.sym == batch * seq and target.sym == (batch * seq, 8)
    assert flat.type.shape == (batch * seq, 8)
    g.outputs.append(flat)
    out = llmc.run_reference(g, {"x": rng.standard_normal((2, 3, 8)).astype(np.float32)},
                             check_types=True)
    assert out["reshape"].shape == (6, 8)


def test_unknowable_dims_become_fresh_symbols(rng):
    g = Graph()
    x = g.add_input("x", TensorType((6, 4), DType.f32))
    shape_in = g.add_input("target", TensorType((2,), DType.i64))
    (y,) = g.add_node("reshape", [x, shape_in])
    assert [str(d) for d in y.shape] == ["reshape.d0", "reshape.d1"]
    g.outputs.append(y)
    out = llmc.run_reference(g, {"x": rng.standard_normal((6, 4)).astype(np.float32),
                                 "target": np.array([3, 8])}, check_types=True)
    assert out["reshape"].shape == (3, 8)


def test_attribute_and_input_errors(rng):
    g, (x, *_rest) = _mlp(rng)
    with pytest.raises(TypeError, match="unknown attribute"):
        g.add_node("softmax", [x], {"dim": 1})
    with pytest.raises(TypeError, match="takes inputs"):
        g.add_node("matmul", [x])
    with pytest.raises(TypeError, match="missing attribute"):
        g.add_node("concat", [x, x])
    with pytest.raises(KeyError, match="no IR op named"):
        g.add_node("frobnicate", [x])
    with pytest.raises(TypeError, match="different dtypes"):
        g.add_node("add", [x, g.add_param("i", np.ones(8, np.int64))])


def test_verifier_catches_broken_graphs(rng):
    g, (x, w, b, h, y, z) = _mlp(rng)
    g.nodes.reverse()  # not a topological order
    with pytest.raises(VerificationError, match="used before it is defined"):
        verify(g)

    g, (x, w, b, h, y, z) = _mlp(rng)
    h.type = TensorType((batch, seq, 5), DType.f32)  # a pass that mistyped a value
    with pytest.raises(VerificationError, match="is typed"):
        verify(g)

    g, (x, w, b, h, y, z) = _mlp(rng)
    stray = Value("stray", x.type, "node", None)
    g.nodes.append(Node("relu", "r", [stray], {}, [Value("out", x.type, "node", None)]))
    with pytest.raises(VerificationError) as e:
        verify(g)
    assert "stray" in str(e.value) and "does not point back" in str(e.value)


def test_reference_runs_hand_built_graph(rng):
    g, (x, w, b, *_rest) = _mlp(rng)
    xv = rng.standard_normal((2, 3, 8)).astype(np.float32)
    got = llmc.run_reference(g, {"x": xv}, check_types=True)["z"]
    yv = xv @ g.store["w"] + g.store["b"]
    want = 0.5 * yv * (1 + np.tanh(np.sqrt(2 / np.pi) * (yv + 0.044715 * yv ** 3)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_text_form_and_networkx(rng):
    g, _ = _mlp(rng)
    text = str(g)
    assert text.splitlines()[0] == "graph mlp(%x: f32[batch, seq, 8]) {"
    assert "%z = gelu(%add) {approximate=tanh}  : f32[batch, seq, 4]" in text
    assert text.splitlines()[-2] == "  return %z"
    nxg = g.to_networkx()
    assert list(nxg.edges) == [("matmul", "add"), ("add", "gelu")]
