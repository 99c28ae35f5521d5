"""The benchmark-size models (GPT-2 124M, Llama-style 0.5B with GQA) import and run: a decode
step through the reference executor matches onnxruntime, before and after the pass pipeline,
which fuses every layer to 6 kernels."""

from __future__ import annotations

import pytest
from conftest import rel_err
from test_reference_vs_onnxruntime import _compare
from zoo_cases import export

import llmc
from llmc import zoo


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("gpt2-124m", 124e6), ("llama-0.5b", 0.5e9)])
def test_realistic_size(name, params, rng):
    path = export(name, exporter="dynamo", kv_cache=True)
    graph = llmc.from_onnx(path)
    assert abs(graph.param_count() - params) / params < 0.1
    feeds = zoo.get(name).feeds(rng, batch=1, seq=1, past=7)
    _compare(path, feeds)

    from llmc.passes.manager import PassContext, run_passes
    from llmc.passes.partition import kernels_per_layer
    from llmc.passes.pipeline import default_pipeline

    want = llmc.run_reference(graph, feeds)
    graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(options={"max_seq_len": 1024}))
    got = llmc.run_reference(graph, feeds)
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-5, k
    assert len(kernels_per_layer(graph)) == 6
