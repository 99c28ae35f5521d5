"""Long-context rotary embeddings (issue 34, item 3): Llama with `rope_type` llama3, YaRN and
linear scaling from an original context of 32 positions (zoo `llama-rope-*`), and Phi-3.5's
LongRoPE (zoo `phi3-longrope`: short and long factors chosen by the step's largest position, a
reduction in the graph), held past that context to onnxruntime's greedy tokens and
teacher-forced logits on the same file, and to transformers' own logits; from both PyTorch
exporters (the TorchScript one cannot export LongRoPE: `aten::copy`); on the cuda target
(Triton's interpreter) and opencl (pocl) too."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err
from test_cuda_target import _greedy
from test_end_to_end import _onnxruntime_greedy
from zoo_cases import export

import llmc
from llmc import runtime, zoo

MODELS = {"llama3": "llama-rope-llama3", "yarn": "llama-rope-yarn", "linear": "llama-rope-linear",
          "longrope": "phi3-longrope"}
KINDS = tuple(MODELS)
PROMPT, STEPS = 44, 6  # positions 0..49: past the original 32


def _prompt(rng):
    return rng.integers(0, 256, PROMPT).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_past_the_original_context_the_tokens_and_logits_are_the_reference(kind, artifacts, rng):
    name = MODELS[kind]
    config = zoo.get(name).config()
    assert (getattr(config, "rope_parameters", None) or config.rope_scaling)["rope_type"] == kind
    prompt = _prompt(rng)
    want_tokens, want_logits = _onnxruntime_greedy(name, prompt, STEPS)
    model = runtime.load(artifacts(name))
    tokens, logits = _greedy(model, prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < 1e-4, (kind, step)
    # transformers itself, every position of the prompt (the export could have dropped the scaling)
    import torch

    with torch.no_grad():
        reference = zoo.get(name).build_torch()(torch.tensor([prompt])).logits[0].numpy()
    model.executor.reset(batch=1)
    assert rel_err(model.forward(np.array([prompt]), past=0)[0], reference) < 1e-4


def test_longrope_switches_factors_when_decoding_crosses_the_original_context(artifacts, rng):
    """A prompt within the original 32 positions (short factors), decoded past it (long factors
    from then on, for the new tokens' keys and queries): onnxruntime's steps on the same file."""
    prompt = rng.integers(0, 256, 28).tolist()
    want, _ = _onnxruntime_greedy("phi3-longrope", prompt, 10)
    assert runtime.load(artifacts("phi3-longrope")).generate(prompt, 10) == want


# llama3 by default, the other scalings with the slow tests (the default run's time is bounded)
@pytest.mark.parametrize("kind", [k if k == "llama3" else pytest.param(k, marks=pytest.mark.slow)
                                  for k in KINDS if k != "longrope"])
def test_the_torchscript_export_too(kind, tmp_path, rng):
    name = MODELS[kind]
    prompt = _prompt(rng)
    want, _ = _onnxruntime_greedy(name, prompt, STEPS, exporter="torchscript")
    art = llmc.compile(export(name, exporter="torchscript", kv_cache=True), output=tmp_path / "m.llmc", max_seq_len=128)
    assert runtime.load(art).generate(prompt, STEPS) == want


@pytest.mark.parametrize("name", ["llama-rope-llama3", pytest.param("phi3-longrope", marks=pytest.mark.slow)])
@pytest.mark.parametrize("target", ["cuda", "opencl"])
def test_gpu_targets_scale_the_rotary_as_the_reference(target, name, tmp_path, rng):
    prompt = _prompt(rng)
    want, _ = _onnxruntime_greedy(name, prompt, 4)
    # fp32 weights and cache (cuda's default is fp16: a near tie could then pick another token)
    art = llmc.compile(export(name, exporter="dynamo", kv_cache=True), target=target, output=tmp_path / "m.llmc",
                       max_seq_len=128, **({"dtype": "fp32", "kv_cache": "f32"} if target == "cuda" else {}))
    assert _greedy(runtime.load(art, interpret=target == "cuda"), prompt, 4)[0] == want
