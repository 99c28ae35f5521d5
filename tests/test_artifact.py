"""The artifact container: what the compiler writes, the runtime opens; anything truncated,
altered, foreign or of another version is refused with a message naming the file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from zoo_cases import export

import llmc
from llmc.artifact_writer import write_artifact
from llmc.passes.manager import PassContext, run_passes
from llmc.passes.pipeline import default_pipeline
from llmc.runtime import safetensors
from llmc.runtime.artifact import FORMAT_VERSION, MANIFEST, WEIGHTS, open_artifact
from llmc.runtime.errors import ArtifactError

TARGET = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    graph = llmc.from_onnx(export("llama-tiny", exporter="dynamo", kv_cache=True))
    graph = run_passes(graph, default_pipeline(), PassContext(options={"max_seq_len": 128}))
    return graph, write_artifact(graph, tmp_path_factory.mktemp("a") / "model.llmc", TARGET)


@pytest.fixture
def art(compiled, tmp_path):
    """A fresh copy each test may damage."""
    import shutil

    return shutil.copytree(compiled[1], tmp_path / "model.llmc")


def test_round_trip(compiled):
    graph, path = compiled
    a = open_artifact(path)
    m = a.manifest
    assert m["format_version"] == FORMAT_VERSION and m["target"] == TARGET
    assert m["model"]["max_seq_len"] == 128
    assert m["model"]["kv_cache"]["layout"] == "[batch, kv_heads, max_seq, head_dim]"
    assert [i["name"] for i in m["model"]["inputs"]][:2] == ["input_ids", "attention_mask"]
    assert m["model"]["outputs"][1]["shape"] == ["batch", "2", "past + seq", "16"]
    weights = safetensors.load(a.file(WEIGHTS))
    assert set(weights) == set(graph.params)
    for name, arr in weights.items():
        np.testing.assert_array_equal(arr, graph.store[name])


def test_truncated_file(art):
    data = (art / WEIGHTS).read_bytes()
    (art / WEIGHTS).write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match=r"weights.safetensors: truncated"):
        open_artifact(art)


def test_altered_file(art):
    data = bytearray((art / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (art / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights.safetensors: checksum mismatch"):
        open_artifact(art)


def test_missing_file(art):
    (art / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=r"weights.safetensors: missing"):
        open_artifact(art)


def test_other_version(art):
    m = json.loads((art / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"format version 2; this runtime reads version 1"):
        open_artifact(art)


def test_path_outside_the_artifact(art):
    m = json.loads((art / MANIFEST).read_text())
    m["files"]["../escape"] = {"bytes": 1, "sha256": "0"}
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        open_artifact(art)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"ONNX? no."),                       # a file, not a directory
    lambda p: p.mkdir(),                                          # a directory without manifest
    lambda p: (p.mkdir(), (p / MANIFEST).write_text("{not json")),
    lambda p: (p.mkdir(), (p / MANIFEST).write_text('{"format": "onnx"}')),
])
def test_foreign_files(tmp_path, make):
    path = tmp_path / "thing"
    make(path)
    with pytest.raises(ArtifactError, match=str(path.name)):
        open_artifact(path)


def test_runtime_opens_without_the_compiler(compiled):
    """Opening an artifact imports none of torch, onnx, onnxruntime, tvm's compiler."""
    code = (f"import sys; from llmc.runtime.artifact import open_artifact; open_artifact({str(compiled[1])!r}); "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'onnx', 'onnxruntime', 'tvm', 'transformers', 'llmc') and not m.startswith('llmc.runtime')"
            " and m != 'llmc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
