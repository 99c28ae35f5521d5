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
from llmc.passes.manager import PassContext, run_passes
from llmc.options import CompileOptions
from llmc.passes.pipeline import default_pipeline
from llmc.runtime import safetensors
from llmc.runtime.artifact import FORMAT_VERSION, MANIFEST, WEIGHTS, digest, open_artifact
from llmc.runtime.errors import ArtifactError


@pytest.fixture(scope="module")
def compiled(artifacts):
    graph = llmc.from_onnx(export("llama-tiny", exporter="dynamo", kv_cache=True))
    graph = run_passes(graph, default_pipeline(), PassContext(options=CompileOptions(max_seq_len=128)))
    return graph, artifacts("llama-tiny")


@pytest.fixture
def art(compiled, tmp_path):
    """A fresh copy each test may damage."""
    import shutil

    return shutil.copytree(compiled[1], tmp_path / "model.llmc")


def test_round_trip(compiled):
    graph, path = compiled
    a = open_artifact(path)
    m = a.manifest
    assert m["format_version"] == FORMAT_VERSION and m["target"]["kind"] == "llvm"
    assert m["model"]["max_seq_len"] == 128 and m["model"]["index_bounds"] == {"input_ids": 256}
    assert m["model"]["kv_cache"]["layout"] == {"order": "bhsd", "page_tokens": 0, "alignment": 64}
    assert [i["name"] for i in m["model"]["inputs"]][:2] == ["input_ids", "attention_mask"]
    assert m["model"]["outputs"][1]["shape"] == ["batch", "2", "past + seq", "16"]
    weights = safetensors.load(a.file(WEIGHTS))
    plain = set(weights) & set(graph.params)
    assert plain and all(n in m["plans"]["values"] for n in weights)
    for name in plain:
        np.testing.assert_array_equal(weights[name], graph.store[name])
    # every tensor starts 64-byte aligned in the file, for the kernels to read it in place
    assert all(w.ctypes.data % 64 == 0 for w in weights.values())


def test_weights_file_reads_with_the_safetensors_library(compiled):
    from safetensors.numpy import load_file

    path = open_artifact(compiled[1]).file(WEIGHTS)
    theirs, ours = load_file(path), safetensors.load(path)
    assert set(ours) <= set(theirs) and all(k.startswith("__pad_") for k in set(theirs) - set(ours))
    for name, w in ours.items():
        np.testing.assert_array_equal(theirs[name], w)


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
    with pytest.raises(ArtifactError, match=rf"format version {FORMAT_VERSION + 1}; this runtime reads version {FORMAT_VERSION}"):
        open_artifact(art)


def edit(art, change, keep_checksum=True):
    """Change the manifest as a faulty compiler would have written it (its checksum agrees), or
    as a hand edit would (it does not)."""
    m = json.loads((art / MANIFEST).read_text())
    change(m)
    if keep_checksum:
        m["manifest_sha256"] = digest(m)
    (art / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change,message", [
    (lambda m: m["files"].update({"../escape": {"bytes": 1, "sha256": "0" * 64}}), "'../escape' lies outside"),
    (lambda m: m["files"].update({"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}), "'/etc/passwd' lies outside"),
    (lambda m: m["kernels"].update(library="kernels/other.so"), "kernels.library: 'kernels/other.so' is not a listed"),
    (lambda m: m["files"].pop(WEIGHTS), "the weights .weights.safetensors. are not listed"),
    (lambda m: m["model"].pop("max_seq_len"), "model.max_seq_len: missing"),
    (lambda m: m["model"].update(max_seq_len="128"), "model.max_seq_len: expected an integer >= 1"),
    (lambda m: m["plans"]["forward"][3].update(kernel="k99_nothing"), r"plans.forward\[3\].kernel: 'k99_nothing'"),
    (lambda m: m["plans"]["forward"][2].update(kind="conv"), r"plans.forward\[2\].kind: expected one of"),
    (lambda m: m["plans"]["forward"][0]["args"].__setitem__(0, "nowhere"), "value 'nowhere' is not described"),
    (lambda m: m["plans"]["values"]["input_ids"].update(shape=[[[1, ["width"]]]]), r"plans.values\['input_ids'\]"),
    (lambda m: m.update(extra=1), "extra: unknown field"),
    (lambda m: m.pop("cpu"), "cpu: missing"),
    (lambda m: m["plans"]["weights"].append("ghost"), r"plans.weights\[\d+\]: 'ghost' is not described"),
])
def test_manifest_is_held_to_its_schema(art, change, message):
    edit(art, change)
    with pytest.raises(ArtifactError, match=message):
        open_artifact(art)


def test_hand_edited_manifest(art):
    edit(art, lambda m: m["model"].update(max_seq_len=100000), keep_checksum=False)
    with pytest.raises(ArtifactError, match="altered after compilation"):
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
