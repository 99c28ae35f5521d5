"""The model zoo: real architectures at the sizes promised, seeded weights, cached exports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zoo_cases import export

import llmc
from llmc import zoo


def _param_count(name):
    with torch.device("meta"):
        model = zoo.get(name).build_torch()
    return sum(p.numel() for p in model.parameters())


def test_benchmark_sizes():
    assert 124e6 <= _param_count("gpt2-124m") <= 125e6
    assert 0.45e9 <= _param_count("llama-0.5b") <= 0.55e9
    cfg = zoo.get("llama-0.5b").config()
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA


def test_tiny_models_have_their_family_traits():
    for m in zoo.TINY_MODELS:
        cfg = m.config()
        assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64, m.name
    assert zoo.get("llama-tiny").config().num_key_value_heads == 2
    assert zoo.get("gpt-neox-tiny").config().use_parallel_residual
    qwen = zoo.get("qwen2-tiny").build_torch()
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's QKV biases


def test_weights_are_seeded_and_land_in_the_export():
    a, b = zoo.get("phi-tiny").build_torch(), zoo.get("phi-tiny").build_torch()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    graph = llmc.from_onnx(export("phi-tiny", exporter="dynamo"))
    embed = a.model.embed_tokens.weight.detach().numpy()
    assert any(graph.store[p].shape == embed.shape and np.array_equal(graph.store[p], embed)
               for p in graph.params)


def test_exports_are_cached(tmp_path):
    m = zoo.get("opt-tiny")
    p1 = m.export(exporter="torchscript", cache_dir=tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = m.export(exporter="torchscript", cache_dir=tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    p3 = m.export(exporter="torchscript", kv_cache=False, cache_dir=tmp_path)
    assert p3 != p1 and len(list(tmp_path.iterdir())) == 2


def test_feeds_fit_the_export(rng):
    m = zoo.get("mistral-tiny")
    feeds = m.feeds(rng, batch=3, seq=4, past=5)
    assert feeds["input_ids"].shape == (3, 4) and feeds["attention_mask"].shape == (3, 9)
    assert feeds["past_key_values.1.value"].shape == (3, 2, 5, 16)
    assert (feeds["position_ids"][0] == np.arange(5, 9)).all()


def test_bad_export_options():
    with pytest.raises(ValueError, match="exporter"):
        zoo.get("gpt2-tiny").export(exporter="tflite")
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.get("gpt-5")
