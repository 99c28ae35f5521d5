"""Every pass keeps the graph's meaning on every zoo family, both exporters, both KV modes:
alone (on the imported graph) and in the pipeline (on the graph as it arrives there). The
reference executor's outputs must not move by more than 1e-5 relative, and the graph must pass
the verifier after every pass."""

from __future__ import annotations

import pytest
from conftest import rel_err
from zoo_cases import decoder_cases, encoder_cases, export

import llmc
from llmc import zoo
from llmc.ir import verify
from llmc.passes.manager import PassContext, run_passes
from llmc.options import CompileOptions
from llmc.ir.kernels import kernels_per_layer
from llmc.passes.pipeline import CLEANUP, RECOGNITION, default_pipeline

CASES = decoder_cases() + [(name, exporter, False) for name, exporter in encoder_cases()]
CONTEXT = CompileOptions(max_seq_len=128)  # the tiny models' context; the feeds stay inside it


def _feeds(name, kv_cache, rng):
    if kv_cache:
        return zoo.get(name).feeds(rng, batch=2, seq=3, past=5, kv_cache=True)
    return zoo.get(name).feeds(rng, batch=2, seq=6, kv_cache=False)


def _assert_same(graph, feeds, want, where):
    got = llmc.run_reference(graph, feeds, check_types=True)
    assert list(got) == list(want), where
    for k in want:
        err = rel_err(got[k], want[k])
        assert err < 1e-5, f"{where}: {k} moved by {err:.1e}"


@pytest.mark.parametrize("name,exporter,kv_cache", CASES)
def test_pipeline_keeps_meaning_after_every_pass(name, exporter, kv_cache, rng):
    path = export(name, exporter=exporter, kv_cache=kv_cache)
    feeds = _feeds(name, kv_cache, rng)
    want = llmc.run_reference(llmc.from_onnx(path), feeds)
    graph, ctx = llmc.from_onnx(path), PassContext(debug=True, options=CONTEXT)
    for p in default_pipeline():
        graph = run_passes(graph, [p], ctx)
        _assert_same(graph, feeds, want, f"after {p.name}")


@pytest.mark.parametrize("name,exporter,kv_cache", CASES)
def test_each_pass_alone_keeps_meaning(name, exporter, kv_cache, rng):
    path = export(name, exporter=exporter, kv_cache=kv_cache)
    feeds = _feeds(name, kv_cache, rng)
    want = llmc.run_reference(llmc.from_onnx(path), feeds)
    for p in {p.name: p for p in default_pipeline()}.values():
        graph = run_passes(llmc.from_onnx(path), [p], PassContext(debug=True, options=CONTEXT))
        verify(graph)
        _assert_same(graph, feeds, want, f"{p.name} alone")


def test_recognition_finds_every_layer_op():
    graph = llmc.from_onnx(export("llama-tiny", exporter="torchscript", kv_cache=True))
    before = len(graph.nodes)
    graph = run_passes(graph, CLEANUP + RECOGNITION)
    ops = [n.op for n in graph.nodes]
    assert len(ops) < before / 3
    assert ops.count("attention") == 2 and ops.count("rms_norm") == 5 and ops.count("rotary") == 4
    assert ops.count("silu") == 2 and ops.count("linear") == 15
    assert not {"shape", "gather_nd", "softmax", "matmul", "sqrt", "pow"} & set(ops)


POST_NORM = ("olmo2-tiny", "gemma2-tiny", "gemma3-tiny")


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_decode_layer_is_at_most_six_kernels(name, exporter):
    """Six, and one more per post-norm (OLMo 2, Gemma 2/3: residual + norm(GEMM output), whose
    norm needs the GEMM's whole row: it takes the residual add instead)."""
    graph = llmc.from_onnx(export(name, exporter=exporter, kv_cache=True))
    graph = run_passes(graph, default_pipeline(), PassContext(debug=True, options=CONTEXT))
    kernels = [n.op for n in kernels_per_layer(graph)]
    assert len(kernels) - kernels.count("norm_add") <= 6, kernels
    assert kernels.count("norm_add") == (2 if name in POST_NORM else 0), kernels
    assert kernels.count("attention") == 1 and kernels.count("rope_cache") == 1
    cache = graph.metadata["kv_cache"]  # the layout is the backend's to add (test_artifact, test_end_to_end)
    assert [e["present"] for e in cache["entries"]] == [v.name for v in graph.outputs[1:]]


def test_sliding_window_needs_the_context_bound():
    """Without max_seq_len, Mistral's sliding-window cache is not a plain append: the cache
    fusion does not apply, and the report says where it stopped."""
    graph = llmc.from_onnx(export("mistral-tiny", exporter="dynamo", kv_cache=True))
    ctx = PassContext(debug=True)
    graph = run_passes(graph, default_pipeline(), ctx)
    assert len(kernels_per_layer(graph)) > 6 and "max_seq_len" not in graph.metadata
    misses = [m for r in ctx.reports for m in r.near_misses if m.rule in ("rope_cache", "gqa_repeat")]
    assert misses


def test_fp16_graph_survives_the_pipeline(rng):
    path = export("llama-tiny", exporter="dynamo", dtype="f16")
    feeds = zoo.get("llama-tiny").feeds(rng, batch=1, seq=4, past=3, dtype="f16")
    want = llmc.run_reference(llmc.from_onnx(path), feeds)
    graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(debug=True, options=CONTEXT))
    got = llmc.run_reference(graph, feeds, check_types=True)
    for k in want:
        assert rel_err(got[k], want[k]) < 5e-3, k
    assert len(kernels_per_layer(graph)) == 6  # the f32-between-casts RMSNorm is recognized too
