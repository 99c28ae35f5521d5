"""Every ONNX op in the converter table, as a single-node model on random inputs: llmc's import and
reference execution must match onnxruntime, and the inferred types must match the data."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import rel_err
from onnx import TensorProto, helper, numpy_helper

import llmc
from llmc.frontends.onnx.converters import CONVERTERS


class In:
    """A runtime input of the single-node model."""

    def __init__(self, array):
        self.array = array


class Const:
    """An initializer (constant) input."""

    def __init__(self, array):
        self.array = array


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def pos(rng, *shape):
    return (rng.random(shape) + 0.5).astype(np.float32)


def i64(*values):
    return np.array(values, np.int64)


def _cases():
    """(id, op_type, inputs(rng) -> list, attrs or attrs(rng) -> dict, opset)."""
    c = []

    def add(op, inputs, attrs=None, opset=20, id=None):
        c.append((id or op, op, inputs, attrs or {}, opset))

    for op in ("Add", "Sub", "Mul", "Div"):
        add(op, lambda r: [In(f32(r, 2, 3, 4)), In(f32(r, 4))])
    add("Div", lambda r: [In(r.integers(-20, 20, (5,))), In(r.integers(1, 7, (5,)))], id="Div-int")
    add("Pow", lambda r: [In(pos(r, 3, 4)), In(f32(r, 3, 4))])
    add("Pow", lambda r: [In(f32(r, 3, 4)), Const(np.array(2.0, np.float32))], id="Pow-square")
    for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
        add(op, lambda r: [In(r.integers(0, 3, (3, 4))), In(r.integers(0, 3, (4,)))])
    for op in ("And", "Or"):
        add(op, lambda r: [In(r.random((3, 4)) > 0.5), In(r.random((3, 4)) > 0.5)])
    for op in ("Neg", "Abs", "Exp", "Tanh", "Sigmoid", "Erf", "Sin", "Cos", "Floor", "Ceil", "Relu"):
        add(op, lambda r: [In(f32(r, 3, 5) * 3)])
    for op in ("Log", "Sqrt", "Reciprocal"):
        add(op, lambda r: [In(pos(r, 3, 5))])
    add("Not", lambda r: [In(r.random((3, 4)) > 0.5)])
    add("IsNaN", lambda r: [In(np.where(r.random((3, 4)) > 0.5, np.nan, f32(r, 3, 4)).astype(np.float32))])
    add("IsInf", lambda r: [In(np.where(r.random((3, 4)) > 0.5, np.inf, f32(r, 3, 4)).astype(np.float32))])
    for op in ("Max", "Min", "Sum"):
        add(op, lambda r: [In(f32(r, 3, 4)), In(f32(r, 4)), In(f32(r, 3, 1))])
    add("Gelu", lambda r: [In(f32(r, 3, 7))])
    add("Gelu", lambda r: [In(f32(r, 3, 7))], {"approximate": "tanh"}, id="Gelu-tanh")
    add("Clip", lambda r: [In(f32(r, 4, 5)), Const(np.array(-0.5, np.float32)), Const(np.array(0.7, np.float32))])
    add("Where", lambda r: [In(r.random((3, 1)) > 0.5), In(f32(r, 3, 4)), In(f32(r, 4))])
    add("Cast", lambda r: [In(f32(r, 3, 4))], {"to": TensorProto.FLOAT16})
    add("Cast", lambda r: [In(r.integers(-9, 9, (3, 4)))], {"to": TensorProto.FLOAT}, id="Cast-int")
    add("CastLike", lambda r: [In(r.random((3, 4)) > 0.5), In(f32(r, 1))])
    add("Identity", lambda r: [In(f32(r, 3, 4))])
    add("Dropout", lambda r: [In(f32(r, 3, 4))])
    add("Constant", lambda r: [], lambda r: {"value": numpy_helper.from_array(f32(r, 2, 3))})
    add("Constant", lambda r: [], {"value_ints": [3, 1, 4]}, id="Constant-ints")
    add("ConstantOfShape", lambda r: [Const(i64(2, 3))],
        {"value": numpy_helper.from_array(np.array([1.5], np.float32))})
    add("Shape", lambda r: [In(f32(r, 2, 3, 4))], {"start": 1})
    add("Reshape", lambda r: [In(f32(r, 2, 3, 4)), Const(i64(0, -1))])
    add("Reshape", lambda r: [In(f32(r, 2, 3, 4)), In(i64(4, 6))], id="Reshape-runtime-shape")
    add("Transpose", lambda r: [In(f32(r, 2, 3, 4))], {"perm": [2, 0, 1]})
    add("Squeeze", lambda r: [In(f32(r, 2, 1, 4, 1)), Const(i64(1, -1))])
    add("Squeeze", lambda r: [In(f32(r, 2, 1, 4, 1))], {"axes": [1]}, opset=11, id="Squeeze-attr")
    add("Unsqueeze", lambda r: [In(f32(r, 2, 4)), Const(i64(0, 3))])
    add("Flatten", lambda r: [In(f32(r, 2, 3, 4))], {"axis": 2})
    add("Concat", lambda r: [In(f32(r, 2, 3)), In(f32(r, 2, 5)), In(f32(r, 2, 1))], {"axis": -1})
    add("Split", lambda r: [In(f32(r, 2, 9)), Const(i64(2, 3, 4))], {"axis": 1})
    add("Split", lambda r: [In(f32(r, 2, 9))], {"axis": 1, "num_outputs": 3}, opset=18, id="Split-n")
    add("Slice", lambda r: [In(f32(r, 5, 8)), Const(i64(1, -2)), Const(i64(4, 0)), Const(i64(0, 1)),
                            Const(i64(1, -2))])
    add("Slice", lambda r: [In(f32(r, 5, 8)), Const(i64(-3)), Const(i64(2**63 - 1)), Const(i64(1))],
        id="Slice-to-end")
    add("Gather", lambda r: [In(f32(r, 3, 5)), In(r.integers(-5, 5, (2, 2)))], {"axis": 1})
    add("GatherND", lambda r: [In(f32(r, 2, 3, 4)), In(r.integers(0, 3, (2, 2, 1)))], {"batch_dims": 1})
    add("Expand", lambda r: [In(f32(r, 3, 1)), Const(i64(2, 3, 4))])
    add("Range", lambda r: [Const(np.array(2, np.int64)), In(np.array(11, np.int64)), Const(np.array(3, np.int64))])
    add("Trilu", lambda r: [In(f32(r, 4, 5)), Const(np.array(1, np.int64))], {"upper": 0})
    add("CumSum", lambda r: [In(f32(r, 3, 4)), Const(np.array(1, np.int64))], {"exclusive": 1, "reverse": 1})
    add("MatMul", lambda r: [In(f32(r, 2, 1, 3, 4)), In(f32(r, 5, 4, 6))])
    add("MatMul", lambda r: [In(f32(r, 3, 4)), In(f32(r, 4))], id="MatMul-vector")
    add("Gemm", lambda r: [In(f32(r, 4, 3)), Const(f32(r, 5, 4)), Const(f32(r, 5))],
        {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0})
    add("Softmax", lambda r: [In(f32(r, 2, 3, 5))], {"axis": 1})
    add("LogSoftmax", lambda r: [In(f32(r, 2, 3, 5))])
    add("LayerNormalization", lambda r: [In(f32(r, 2, 3, 8)), Const(f32(r, 8)), Const(f32(r, 8))],
        {"epsilon": 1e-3}, opset=17)
    add("RMSNormalization", lambda r: [In(f32(r, 2, 3, 8)), Const(f32(r, 8))], opset=23)
    for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        add(op, lambda r: [In(f32(r, 2, 3, 4)), Const(i64(-1, 0))], {"keepdims": 0}, opset=18)
        add(op, lambda r: [In(f32(r, 2, 3, 4))], {"axes": [1]}, opset=13 if op != "ReduceSum" else 11,
            id=f"{op}-attr")
    add("Attention", lambda r: [In(f32(r, 2, 4, 5, 8)), In(f32(r, 2, 2, 5, 8)), In(f32(r, 2, 2, 5, 8)),
                                In(r.random((5, 5)) > 0.2)], {"is_causal": 1}, opset=23)
    add("Attention", lambda r: [In(f32(r, 1, 2, 3, 8)), In(f32(r, 1, 2, 3, 8)), In(f32(r, 1, 2, 3, 8)),
                                In(f32(r, 1, 1, 3, 7)), In(f32(r, 1, 2, 4, 8)), In(f32(r, 1, 2, 4, 8))],
        {"is_causal": 1}, opset=23, id="Attention-causal-past")
    add("Attention", lambda r: [In(f32(r, 2, 3, 16)), In(f32(r, 2, 3, 8)), In(f32(r, 2, 3, 8)), None,
                                In(f32(r, 2, 2, 4, 4)), In(f32(r, 2, 2, 4, 4))],
        {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.3}, opset=23, id="Attention-3d-past")
    # onnxruntime's contrib ops, as its genai model builder writes them
    add("SimplifiedLayerNormalization", lambda r: [In(f32(r, 2, 3, 8)), Const(f32(r, 8))], {"epsilon": 1e-3})
    add(f"{MS}.SkipSimplifiedLayerNormalization", lambda r: [In(f32(r, 2, 3, 8)), In(f32(r, 2, 3, 8)),
                                                           Const(f32(r, 8)), Const(f32(r, 8))])
    add(f"{MS}.SkipLayerNormalization", lambda r: [In(f32(r, 2, 3, 8)), In(f32(r, 2, 3, 8)), Const(f32(r, 8)),
                                                 Const(f32(r, 8)), Const(f32(r, 8))], {"epsilon": 1e-3})
    for zero in (False, True):  # K 80 in blocks of 32: the last block padded
        add(f"{MS}.MatMulNBits", lambda r, zero=zero: [
            In(f32(r, 2, 3, 80)), Const(r.integers(0, 256, (5, 3, 16), dtype=np.uint8)), Const(pos(r, 15) / 8),
            Const(r.integers(0, 256, (5, 2), dtype=np.uint8)) if zero else None],
            {"K": 80, "N": 5, "bits": 4, "block_size": 32}, id=f"MatMulNBits{'-zero' * zero}")
    for rotary, window in ((1, -1), (0, -1), (1, 2)):  # packed QKV: 4 heads, 2 KV heads of 16; 3 tokens after 4
        add(f"{MS}.GroupQueryAttention", lambda r: [
            In(f32(r, 1, 3, 128)), None, None, In(f32(r, 1, 2, 4, 16)), In(f32(r, 1, 2, 4, 16)),
            In(np.array([6], np.int32)), In(np.array(7, np.int32)), Const(f32(r, 16, 8)), Const(f32(r, 16, 8))],
            {"num_heads": 4, "kv_num_heads": 2, "do_rotary": rotary, "local_window_size": window},
            id=f"GroupQueryAttention-rotary{rotary}" + (f"-window{window}" if window > 0 else ""))
    return c


MS = "com.microsoft"


CASES = _cases()
_OUTPUTS = {"Split": 3, "Attention-3d-past": 3, "Attention-causal-past": 3, "GroupQueryAttention-rotary1": 3, "GroupQueryAttention-rotary1-window2": 3,
            "GroupQueryAttention-rotary0": 3, f"{MS}.SkipSimplifiedLayerNormalization": ["out0", "", "", "out3"],
            f"{MS}.SkipLayerNormalization": ["out0", "", "", "out3"]}


def _model(op, inputs, attrs, opset, n_out):
    names, graph_inputs, inits = [], [], []
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(x, Const):
            inits.append(numpy_helper.from_array(x.array, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(x.array.dtype), x.array.shape))
    outs = n_out if isinstance(n_out, list) else [f"out{i}" for i in range(n_out)]
    domain, _, op_type = op.rpartition(".")
    node = helper.make_node(op_type, names, outs, name=f"the_{op_type}", domain=domain or None, **attrs)
    graph = helper.make_graph([node], "g", graph_inputs,
                              [onnx.ValueInfoProto(name=o) for o in outs if o], inits)
    # IR version 10: what onnxruntime 1.18+ reads (newer onnx writes newer versions by default).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             ir_version=10)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(case, rng, tmp_path):
    id_, op, make_inputs, attrs, opset = case
    inputs = make_inputs(rng)
    attrs = attrs(rng) if callable(attrs) else attrs
    model = _model(op, inputs, attrs, opset, _OUTPUTS.get(id_, _OUTPUTS.get(op, 1)))
    path = tmp_path / "op.onnx"
    onnx.save(model, path)
    feeds = {f"in{i}": x.array for i, x in enumerate(inputs) if isinstance(x, In)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = session.run(None, feeds)
    got = list(llmc.run_reference(llmc.from_onnx(path), feeds, check_types=True).values())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype == np.bool_ or w.dtype.kind in "iu":
            np.testing.assert_array_equal(g, w)
        else:
            assert np.array_equal(np.isnan(g), np.isnan(w))
            assert rel_err(np.nan_to_num(g), np.nan_to_num(w)) < 1e-5


def test_every_converter_is_tested():
    assert {c[1] for c in CASES} == set(CONVERTERS)
