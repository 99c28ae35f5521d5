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
