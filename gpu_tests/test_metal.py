"""The metal target on an Apple GPU (`scripts/metal-check.sh` runs this on a Mac; elsewhere it
fails at the first load, by name): every zoo decoder family gives onnxruntime's greedy tokens,
and its logits within 1e-4 (Metal compiles with fast math: exp and division are approximate);
with quantized weights and the int8 KV cache, a whole generation gives the tokens of a step by
step one (caches and intermediates reused correctly across steps)."""

from __future__ import annotations

import pytest
from conftest import rel_err
from onnx_reference import OnnxDecoder
from zoo_cases import compiler, export

from llmc import runtime, zoo

STEPS = 8


@pytest.fixture(scope="module")
def metal(tmp_path_factory):
    return compiler(tmp_path_factory.mktemp("metal"), "metal")


def _greedy(model, prompt, steps):
    model.executor.reset(batch=1)
    logits = [model.forward([prompt], past=0, last_only=True)[0, -1].copy()]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.forward([[tokens[-1]]], past=len(prompt) + i)[0, -1].copy())
    return tokens, logits[:steps]


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_metal_gives_onnxruntime_tokens(name, metal, rng):
    art = metal(name)
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 9).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    model = runtime.load(art)
    tokens, logits = _greedy(model, prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < 1e-4, step
    assert model.generate(prompt, STEPS) == want_tokens


@pytest.mark.parametrize("options", [dict(quant="w8"), dict(quant="w4", group_size=32, kv_cache="int8")],
                         ids=["w8", "w4-int8-kv"])
def test_metal_quantized_runs_to_the_same_tokens_twice(options, metal, rng):
    model = runtime.load(metal("llama-tiny", **options))
    prompt = rng.integers(0, 256, 9).tolist()
    tokens, _ = _greedy(model, prompt, STEPS)
    assert model.generate(prompt, STEPS) == tokens
