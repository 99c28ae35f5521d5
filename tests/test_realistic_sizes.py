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

    from llmc.options import CompileOptions
    from llmc.ir.kernels import kernels_per_layer
    from llmc.passes.pipeline import default_pipeline

    want = llmc.run_reference(graph, feeds)
    graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(options=CompileOptions(max_seq_len=1024)))
    got = llmc.run_reference(graph, feeds)
    for k in want:
        assert rel_err(got[k], want[k]) < 1e-5, k
    assert len(kernels_per_layer(graph)) == 6


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-124m", "llama-0.5b"])
def test_realistic_size_compiled_matches_onnxruntime(name, rng, tmp_path):
    """The TVM kernels at real widths (768 and 1536 features, vocabularies of 50257 and 32000):
    a compiled artifact's prefill and decode steps against onnxruntime, teacher-forced."""
    import numpy as np
    import onnxruntime as ort

    from llmc import runtime

    path = export(name, exporter="dynamo", kv_cache=True)
    model = runtime.load(llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=32))
    cfg = zoo.get(name).config()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    past = {f"past_key_values.{i}.{k}": np.zeros((1, kv_heads, 0, cfg.hidden_size // cfg.num_attention_heads),
                                                 np.float32) for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
    ids = rng.integers(0, cfg.vocab_size, 8).tolist()
    model.executor.reset(batch=1)
    new, start = ids, 0
    for step in range(4):  # the prefill, then three decode steps
        outs = session.run(None, {"input_ids": np.array([new]), "position_ids": np.arange(start, start + len(new))[None],
                                  "attention_mask": np.ones((1, start + len(new)), np.int64), **past})
        got = model.forward(np.array([new]), past=start)
        # the kernels' own tolerance, through 12 and 24 layers
        assert rel_err(got, outs[0]) < 1e-5, step
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outs[1:])}
        start += len(new)
        new = [int(outs[0][0, -1].argmax())]
