"""llama.cpp as a benchmark peer: the zoo's Llama and GPT-2 weights written as GGUF load in
llama.cpp and give the transformers model's logits (laid out as llama.cpp's own converter does),
and llama.cpp's quantizer shrinks them as its q8_0 and q4_0 promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

from llmc import zoo
from llmc.tools import llama_cpp


@pytest.fixture(scope="module", params=["llama-tiny", "gpt2-tiny"])
def f32_gguf(request, tmp_path_factory):
    model = zoo.get(request.param).build_torch()
    return model, llama_cpp.write_gguf(model, tmp_path_factory.mktemp("gguf") / f"{request.param}-f32.gguf")


def _llama_cpp_logits(path, tokens):
    import llama_cpp as lc

    llama_cpp._quiet(lc)
    llm = lc.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)])


def test_gguf_of_the_zoo_model_gives_its_logits_in_llama_cpp(f32_gguf, rng):
    model, path = f32_gguf
    tokens = [int(t) for t in rng.integers(0, model.config.vocab_size, 12)]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    assert rel_err(_llama_cpp_logits(path, tokens), want) < 1e-3


@pytest.mark.parametrize("ftype,ratio", [("q8_0", 3.5), ("q4_0", 5)])
def test_llama_cpp_quantizer_shrinks_the_weights(f32_gguf, ftype, ratio, tmp_path, rng):
    model, path = f32_gguf
    quantized = llama_cpp.quantize(path, tmp_path / f"{ftype}.gguf", ftype, threads=2)
    assert llama_cpp.decode_weight_bytes(quantized) < llama_cpp.decode_weight_bytes(path) / ratio
    tokens = [int(t) for t in rng.integers(0, model.config.vocab_size, 12)]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    assert rel_err(_llama_cpp_logits(quantized, tokens), want) < (0.05 if ftype == "q8_0" else 0.5)
