"""The metal target on an Apple GPU (`scripts/metal-check.sh` runs this on a Mac; elsewhere it
fails at the first load, by name): every zoo decoder family gives onnxruntime's greedy tokens,
and its logits within 1e-4 (Metal compiles with fast math: exp and division are approximate);
with quantized or f16 weights, the int8 KV cache or a paged one, a whole generation gives the
tokens of a step by step one (caches and intermediates reused correctly across steps)."""

from __future__ import annotations

import pytest
from test_cuda_target import _greedy
from test_opencl_target import STEPS, check_onnxruntime_tokens
from zoo_cases import compiler

from llmc import runtime, zoo


@pytest.fixture(scope="module")
def metal(tmp_path_factory):
    return compiler(tmp_path_factory.mktemp("metal"), "metal")


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_metal_gives_onnxruntime_tokens(name, metal, rng):
    check_onnxruntime_tokens(metal(name), name, rng, 1e-4)


@pytest.mark.parametrize("options", [dict(quant="w8"), dict(quant="w4", group_size=32, kv_cache="int8"),
                                     dict(dtype="fp16"), dict(kv_layout="paged:4")],
                         ids=["w8", "w4-int8-kv", "fp16", "paged"])
def test_metal_quantized_runs_to_the_same_tokens_twice(options, metal, rng):
    model = runtime.load(metal("llama-tiny", **options))
    prompt = rng.integers(0, 256, 9).tolist()
    tokens, _ = _greedy(model, prompt, STEPS)
    assert model.generate(prompt, STEPS) == tokens
