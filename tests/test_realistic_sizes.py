"""The benchmark-size models (GPT-2 124M, Llama-style 0.5B with GQA) import and run: a decode
step through the reference executor matches onnxruntime."""

from __future__ import annotations

import pytest
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
    _compare(path, zoo.get(name).feeds(rng, batch=1, seq=1, past=7))
