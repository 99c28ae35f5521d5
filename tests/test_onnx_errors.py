"""Bad input gets one clear error naming the problem, and the CLI exits with status 2 and no
traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from zoo_cases import export

import llmc
from llmc.errors import ConversionError, ModelLoadError, UnsupportedOpsError


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *map(str, args)],
                          capture_output=True, text=True)


def _assert_clean_failure(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def _tiny_model(nodes, inputs, outputs, inits=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        llmc.from_onnx(tmp_path / "nope.onnx")
    _assert_clean_failure(_cli("inspect", tmp_path / "nope.onnx"), "nope.onnx", "no such file")


@pytest.mark.parametrize("content", [b"", b"this is not a model\n", bytes(range(256)) * 4])
def test_not_onnx(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        llmc.from_onnx(path)
    _assert_clean_failure(_cli("inspect", path), "bad.onnx", "not an ONNX model")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        llmc.from_onnx(tmp_path)


def test_all_unsupported_ops_reported_at_once(tmp_path):
    f = helper.make_tensor_value_info
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("Hardmax", ["a"], ["b"], name="hm1"),
        helper.make_node("Hardmax", ["b"], ["c"], name="hm2"),
        helper.make_node("FusedMatMul", ["c", "c"], ["d"], name="fused", domain="com.microsoft"),
    ]
    model = _tiny_model(nodes, [f("x", onnx.TensorProto.FLOAT, [2, 2])],
                        [f("d", onnx.TensorProto.FLOAT, [2, 2])])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedOpsError) as e:
        llmc.from_onnx(path)
    assert e.value.missing == {"Hardmax": ["hm1", "hm2"], "com.microsoft.FusedMatMul": ["fused"]}
    assert "opset 20" in str(e.value)
    _assert_clean_failure(_cli("inspect", path), "Hardmax", "hm1, hm2", "com.microsoft.FusedMatMul",
                          "fused", "opset 20")


def test_unsupported_form_names_the_node(tmp_path):
    f = helper.make_tensor_value_info
    # Squeeze axes computed at run time: supported op, unsupported form.
    node = helper.make_node("Squeeze", ["x", "axes"], ["y"], name="dyn_squeeze")
    model = _tiny_model([node], [f("x", onnx.TensorProto.FLOAT, [1, 3]),
                                 f("axes", onnx.TensorProto.INT64, [1])],
                        [f("y", onnx.TensorProto.FLOAT, [3])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ConversionError, match="dyn_squeeze.*Squeeze.*must be a constant"):
        llmc.from_onnx(path)


def _external_model(tmp_path):
    src = export("llama-tiny", exporter="dynamo", external_data=True)
    dst = tmp_path / "model.onnx"
    dst.write_bytes(src.read_bytes())
    data = tmp_path / "model.onnx.data"
    data.write_bytes(src.with_name("model.onnx.data").read_bytes())
    return dst, data


def test_external_data_missing(tmp_path):
    path, data = _external_model(tmp_path)
    data.unlink()
    with pytest.raises(ModelLoadError, match="model.onnx.data.*does not exist"):
        llmc.from_onnx(path)
    _assert_clean_failure(_cli("inspect", path), "does not exist")


def test_external_data_truncated(tmp_path):
    path, data = _external_model(tmp_path)
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        llmc.from_onnx(path)


def test_external_data_outside_model_folder(tmp_path):
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    f = helper.make_tensor_value_info
    model = _tiny_model([helper.make_node("Add", ["x", "w"], ["y"])],
                        [f("x", onnx.TensorProto.FLOAT, [2, 2])], [f("y", onnx.TensorProto.FLOAT, [2, 2])],
                        [weight])
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        llmc.from_onnx(path)


def test_feed_errors_name_the_input(rng):
    from llmc.ir.evaluate import FeedError

    graph = llmc.from_onnx(export("gpt2-tiny", exporter="dynamo", kv_cache=False))
    ids = rng.integers(0, 256, (1, 5))
    mask = np.ones((1, 5), np.int64)
    pos = np.arange(5)[None]
    with pytest.raises(FeedError, match="missing input 'position_ids'"):
        llmc.run_reference(graph, {"input_ids": ids, "attention_mask": mask})
    with pytest.raises(FeedError, match="input 'attention_mask': expected i64"):
        llmc.run_reference(graph, {"input_ids": ids, "attention_mask": mask.astype(np.float32),
                                   "position_ids": pos})
    with pytest.raises(FeedError, match="input 'position_ids'.*does not fit"):
        llmc.run_reference(graph, {"input_ids": ids, "attention_mask": mask,
                                   "position_ids": np.arange(4)[None]})
