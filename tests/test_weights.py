"""The weight store maps files instead of reading them, and rejects broken ones."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file
from zoo_cases import export

import llmc
from llmc.errors import ModelLoadError
from llmc.weights import WeightStore


def test_safetensors_are_memory_mapped(tmp_path, rng):
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
               "b": rng.integers(-5, 5, (7,)).astype(np.int64),
               "c": rng.standard_normal((2, 2)).astype(np.float16)}
    save_file(tensors, tmp_path / "w.safetensors")
    store = WeightStore()
    assert sorted(store.add_safetensors(tmp_path / "w.safetensors", prefix="m.")) == ["m.a", "m.b", "m.c"]
    for name, want in tensors.items():
        got = store[f"m.{name}"]
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable and not got.flags.owndata  # a view into the mapped file


def test_truncated_safetensors(tmp_path, rng):
    save_file({"a": rng.standard_normal((64, 64)).astype(np.float32)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-100])
    with pytest.raises(ModelLoadError, match="truncated"):
        WeightStore().add_safetensors(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        WeightStore().add_safetensors(tmp_path / "junk.safetensors")


def test_onnx_external_data_is_mapped_not_copied():
    path = export("llama-tiny", exporter="dynamo", external_data=True)
    graph = llmc.from_onnx(path)
    embed = graph.store["model.model.embed_tokens.weight"]
    assert embed.shape == (256, 64) and not embed.flags.owndata and not embed.flags.writeable
    data_size = path.with_name("model.onnx.data").stat().st_size
    assert graph.param_bytes() <= data_size + 4096


def test_inline_initializers_are_mapped_not_copied():
    path = export("llama-tiny", exporter="dynamo")
    graph = llmc.from_onnx(path)
    embed = graph.store["model.model.embed_tokens.weight"]
    assert embed.shape == (256, 64) and not embed.flags.owndata and not embed.flags.writeable
    mapped = graph.store.map_file(path)
    assert np.shares_memory(embed, mapped)


def _tensor_bytes(name: str, dims: list[int], data_type: int, raw: bytes, raw_first: bool) -> bytes:
    """A TensorProto on the wire, with raw_data (field 9) before or after the other fields:
    protobuf allows any order, and exporters other than onnx's own may write either."""
    from onnx import TensorProto

    t = TensorProto(name=name, dims=dims, data_type=data_type)
    head = bytes([9 << 3 | 2]) + _varint(len(raw)) + raw
    return head + t.SerializeToString() if raw_first else t.SerializeToString() + head


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def test_onnx_wire_split_finds_every_inline_tensor(tmp_path, rng):
    """`wire.split_model` against protobuf's own parse: the same model without raw bytes, and
    each initializer's bytes where it says, whatever the field order and encoding."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from llmc.frontends.onnx import wire

    dtypes = [np.float32, np.float16, np.int64, np.int8]
    arrays = {f"w{i}": rng.standard_normal(tuple(rng.integers(1, 9, rng.integers(1, 4)))).astype(dtypes[i % 4])
              for i in range(12)}
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    graph.initializer.append(helper.make_tensor("listed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))  # float_data
    model = helper.make_model(graph)
    body = bytearray()
    for i, (name, a) in enumerate(arrays.items()):
        body += bytes([5 << 3 | 2])
        tensor = _tensor_bytes(name, list(a.shape), helper.np_dtype_to_tensor_dtype(a.dtype), a.tobytes(), i % 2 == 0)
        body += _varint(len(tensor)) + tensor
    graph_bytes = model.graph.SerializeToString() + bytes(body)
    model.ClearField("graph")
    data = model.SerializeToString() + bytes([7 << 3 | 2]) + _varint(len(graph_bytes)) + graph_bytes
    (tmp_path / "m.onnx").write_bytes(data)

    stripped, raw = wire.split_model(tmp_path / "m.onnx")
    want = onnx.load(str(tmp_path / "m.onnx"))
    got = onnx.ModelProto.FromString(stripped)
    assert len(got.graph.initializer) == len(want.graph.initializer) == len(raw) == 13
    for t_got, t_want, where in zip(got.graph.initializer, want.graph.initializer, raw):
        if t_want.name == "listed":
            assert where is None
            np.testing.assert_array_equal(numpy_helper.to_array(t_got), [1, 2, 3])
            continue
        assert not t_got.raw_data and t_got.name == t_want.name and list(t_got.dims) == list(t_want.dims)
        offset, length = where
        assert data[offset:offset + length] == t_want.raw_data == arrays[t_want.name].tobytes()
    assert got.graph.node == want.graph.node and got.graph.output == want.graph.output


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_onnx_wire_split_refuses_a_truncated_file(cut, tmp_path):
    path = export("llama-tiny", exporter="dynamo")
    data = path.read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        llmc.from_onnx(tmp_path / "model.onnx")


def test_streamed_weights_are_made_one_at_a_time(tmp_path, rng):
    """`safetensors.save` with functions for values: each made when written and dropped after
    (`after_each` in between), the file read back by the safetensors library itself."""
    from safetensors.numpy import load_file

    from llmc.runtime import safetensors

    arrays = {"x" * 200 + str(i): rng.standard_normal(tuple(rng.integers(1, 4, 8))).astype(np.float32)
              for i in range(5)}  # long names and 8 dims: the header's reserved room must hold them
    arrays["scalar"] = np.float32(rng.standard_normal())
    alive, events = [], []

    def maker(name):
        def make():
            events.append(("make", name))
            alive.append(name)
            return arrays[name]
        return make

    def after_each():
        events.append(("written", alive.pop()))
        assert not alive

    written = safetensors.save(tmp_path / "w.safetensors", {n: maker(n) for n in arrays}, after_each=after_each)
    assert [e for e, _ in events] == ["make", "written"] * len(arrays)
    assert written == {n: ("float32", list(np.shape(a))) for n, a in arrays.items()}
    loaded = load_file(tmp_path / "w.safetensors")
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name], a)
    for name, a in safetensors.load(tmp_path / "w.safetensors").items():
        assert a.ctypes.data % safetensors.ALIGN == 0 or a.size == 0
