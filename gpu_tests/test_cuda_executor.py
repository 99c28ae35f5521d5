"""The CUDA executor on a GPU: every zoo decoder family gives onnxruntime's greedy tokens and
logits in fp32 (exact f32 arithmetic: the GEMMs and attention take no TF32 shortcut), fp16
within half precision, the interpreter's logits on the same artifact, and the same logits
whether a decode step is launched kernel by kernel or replayed from its CUDA graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from onnx_reference import OnnxDecoder
from zoo_cases import compiler, export

from llmc import runtime, zoo

STEPS = 16
ARCH = "sm_{}{}".format(*torch.cuda.get_device_capability())


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    return compiler(tmp_path_factory.mktemp("cuda"), "cuda", arch=ARCH)


def _greedy(model, prompt, steps):
    model.executor.reset(batch=1)
    logits = [model.forward(np.array([prompt]), past=0, last_only=True)[0, -1].copy()]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(model.forward(np.array([[tokens[-1]]]), past=len(prompt) + i)[0, -1].copy())
    return tokens, logits[:steps]


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gpu_matches_onnxruntime(name, dtype, cuda, rng):
    art = cuda(name, dtype=dtype)
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 9).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    tokens, logits = _greedy(runtime.load(art), prompt, STEPS)
    tolerance = 1e-5 if dtype == "fp32" else 1e-2
    if dtype == "fp32":
        assert tokens == want_tokens
        assert runtime.load(art).generate(prompt, STEPS) == want_tokens  # greedy: argmax on the device
    for step in range(STEPS if dtype == "fp32" else 1):  # fp16 parts from fp32 at near ties: the prefill only
        assert rel_err(logits[step], want_logits[step]) < tolerance, step


@pytest.mark.parametrize("options", [dict(dtype="fp16"), dict(quant="w4", group_size=64, kv_cache="int8")],
                         ids=["fp16", "w4-int8-kv"])
def test_gpu_matches_the_interpreter(options, cuda, rng):
    art = cuda("llama-tiny", **options)
    prompt = rng.integers(0, 256, 9).tolist()
    want_tokens, want_logits = _greedy(runtime.load(art, interpret=True), prompt, 4)
    tokens, logits = _greedy(runtime.load(art), prompt, 4)
    assert tokens == want_tokens
    for a, b in zip(logits, want_logits):
        assert rel_err(a, b) < 1e-4  # f16 tensor-core sums in another order than the interpreter's


def test_graph_replay_matches_kernel_by_kernel_launches(cuda, rng):
    """Decode replays one captured graph for every position; the same steps enqueued kernel by
    kernel (grids at the current length) give the same tokens and logits."""
    model = runtime.load(cuda("qwen2-tiny", dtype="fp32"))
    prompt = rng.integers(0, 256, 5).tolist()
    replayed = _greedy(model, prompt, 24)
    model.executor.use_graphs = False
    direct = _greedy(model, prompt, 24)
    assert replayed[0] == direct[0]
    for a, b in zip(replayed[1], direct[1]):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("kv_cache", ["f16", "int8"])
def test_gpu_paged_batch_gives_each_prompt_its_solo_tokens(kv_cache, cuda, rng):
    """A paged cache on the GPU: prompts of different lengths prefilled one by one into a pool
    that grows (copied on the device), then decoded together, replaying one graph per batch
    size as sequences end; each gets the tokens the contiguous artifact gives it alone."""
    alone = runtime.load(cuda("llama-tiny", dtype="fp32", kv_cache=kv_cache))
    paged = runtime.load(cuda("llama-tiny", dtype="fp32", kv_cache=kv_cache, kv_layout="paged:4"))
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 11, 30, 6)]
    want = [alone.generate(p, 24) for p in prompts]
    assert paged.generate(prompts, 24) == want
    assert paged.executor.pages.capacity > len(prompts)  # the pool grew
    paged.eos_token_ids = alone.eos_token_ids = {want[1][3]}
    assert paged.generate(prompts, 24) == [alone.generate(p, 24) for p in prompts]
