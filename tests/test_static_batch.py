"""Static-batch exports (batch 1 fixed in every input's shape, as mobile and some hand exports
write them), by both PyTorch exporters: onnxruntime's greedy tokens on the cpu target with a
contiguous and a paged cache, on the cuda target under Triton's interpreter and on opencl
(pocl); a batch of prompts runs one prompt at a time, each getting its solo tokens; a step of
several sequences is refused by name; the server serves such an artifact one request at a time."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from test_cuda_target import _greedy
from test_end_to_end import _onnxruntime_greedy
from zoo_cases import EXPORTERS, export

import llmc
from llmc import runtime, zoo
from llmc.runtime.errors import LlmcError

NAME, STEPS = "llama-tiny", 6


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`compiled(exporter, **options)`: the static-batch export compiled once (context 64)."""
    root, cache = tmp_path_factory.mktemp("static"), {}

    def get(exporter, **options):
        key = (exporter, tuple(sorted(options.items())))
        if key not in cache:
            tag = "-".join([exporter] + [f"{k}{v}".replace(":", "") for k, v in sorted(options.items())])
            cache[key] = llmc.compile(export(NAME, exporter=exporter, static_batch=True), output=root / f"{tag}.llmc",
                                      max_seq_len=64, **options)
        return cache[key]
    return get


def _prompts(rng, lengths=(7, 3, 12)):
    return [rng.integers(0, zoo.get(NAME).config().vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("layout", ["auto", "paged:4"])
def test_a_static_batch_export_gives_onnxruntime_tokens_prompt_by_prompt(exporter, layout, compiled, rng):
    prompts = _prompts(rng)
    want = [_onnxruntime_greedy(NAME, p, STEPS, exporter=exporter, static_batch=True)[0] for p in prompts]
    model = runtime.load(compiled(exporter, kv_layout=layout))
    assert model.fixed_batch == 1
    assert model.generate(prompts[0], STEPS) == want[0]
    assert model.generate(prompts, STEPS) == want  # one prompt after another, each its solo tokens


def test_a_step_of_several_sequences_is_refused_by_name(compiled):
    model = runtime.load(compiled("dynamo", kv_layout="paged:4"))
    with pytest.raises(LlmcError, match=r"fixes a batch of 1 \(its input 'input_ids' is \[1, seq\]\): a step of 2"):
        model.forward(np.array([[1, 2], [3, 4]]), past=0)
    model.executor.reset(batch=1)
    with pytest.raises(LlmcError, match="a step of 2 sequences cannot run"):
        model.step_rows([1, 2], [0, 0], [0, 1], [0, 1])


@pytest.mark.parametrize("target", ["cuda", "opencl"])
def test_gpu_targets_compile_and_run_a_static_batch_export(target, tmp_path, rng):
    """cuda under Triton's interpreter, opencl on pocl; before, the cuda planner refused the
    GEMMs' rows (seq, not batch * seq)."""
    prompt = _prompts(rng, (5,))[0]
    want, _ = _onnxruntime_greedy(NAME, prompt, 4, static_batch=True)
    art = llmc.compile(export(NAME, exporter="dynamo", static_batch=True), target=target,
                       output=tmp_path / "m.llmc", max_seq_len=64)
    tokens, _ = _greedy(runtime.load(art, interpret=target == "cuda"), prompt, 4)
    assert tokens == want


def test_the_server_serves_a_static_batch_artifact_one_request_at_a_time(compiled, rng, caplog):
    from llmc.serve.engine import Engine, Request

    path = compiled("dynamo", kv_layout="paged:4")
    prompts = _prompts(rng)
    want = [runtime.load(path).generate(p, 5) for p in prompts]
    with caplog.at_level(logging.WARNING):
        engine = Engine(runtime.load(path), max_batch=4)
    assert engine.max_batch == 1 and "fixes a batch of 1" in caplog.text

    async def one(prompt):
        return [o.token async for o in engine.submit(Request(tuple(prompt), 5, ignore_eos=True))
                if o.token is not None]

    async def all_of():
        return await asyncio.gather(*(one(p) for p in prompts))
    try:
        assert asyncio.run(all_of()) == want
    finally:
        engine.shutdown(grace=1)


@pytest.mark.parametrize("target", ["arm64", "metal"])
def test_targets_that_cannot_run_here_compile_it(target, tmp_path):
    """arm64 runs under qemu with the native runtime (one sequence: test_native_runtime), metal on
    a Mac: here, that their plans are made."""
    import json

    art = llmc.compile(export(NAME, exporter="dynamo", static_batch=True), target=target,
                       output=tmp_path / "m.llmc", max_seq_len=64)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["inputs"][0]["shape"] == ["1", "seq"] and manifest["plans"]["forward"]
