"""The opencl and metal targets end to end. opencl artifacts run on pocl (an OpenCL driver for
this CPU) through the runtime's OpenCL executor: every zoo decoder family gives onnxruntime's
greedy tokens and its logits within f32 rounding; quantized weights and the int8 KV cache give
the CPU target's results (f32 activations, dequantized in the kernels); f16 weights stay within
half precision of onnxruntime; a paged cache gives each prompt of a batch its solo tokens. metal
artifacts hold the same kernels from the same schedules, as Metal source with the same launch
tables; running one here is a clear error. pocl's speed says nothing about a GPU's: nothing here is timed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel_err
from onnx_reference import OnnxDecoder, at_accuracy_level_0
from test_cuda_target import _greedy, _some_slow, quantized_tolerance
from test_third_party import FILES, FIXTURES, PROMPT
from zoo_cases import compiler, export

import llmc
from llmc import runtime, zoo
from llmc.runtime.artifact import open_artifact
from llmc.runtime.errors import LlmcError

STEPS = 6


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    """`gpu(name, target="opencl", **options)`: a zoo model compiled for a GPU target, once."""
    by_target = {t: compiler(tmp_path_factory.mktemp(t), t) for t in ("opencl", "metal")}
    return lambda name, target="opencl", **options: by_target[target](name, **options)


def check_onnxruntime_tokens(art, name: str, rng, tolerance: float) -> None:
    """The artifact of zoo model `name` gives onnxruntime's greedy tokens, step by step and in
    `generate`, and its logits at every step within `tolerance`."""
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 7).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    model = runtime.load(art)
    tokens, logits = _greedy(model, prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < tolerance, step
    assert model.generate(prompt, STEPS) == want_tokens


@pytest.mark.parametrize("name", _some_slow([m.name for m in zoo.TINY_DECODERS], ("llama-tiny",)))
def test_gives_onnxruntime_tokens_and_logits(name, gpu, rng):
    check_onnxruntime_tokens(gpu(name), name, rng, 1e-5)


@pytest.mark.parametrize("name", _some_slow(FILES, ("optimum-qwen2",)))
def test_files_nobody_here_made(name, tmp_path):
    """optimum's and onnxruntime-genai's builder's exports (its int4 MatMulNBits files at
    onnxruntime's f32 accuracy level, as llmc computes them on GPUs): onnxruntime's greedy tokens."""
    path = FIXTURES / name / "model.onnx"
    if name.endswith("int4"):
        path = at_accuracy_level_0(path, tmp_path)
    art = llmc.compile(path, target="opencl", output=tmp_path / "m.llmc", max_seq_len=64)
    want, _ = OnnxDecoder(path, art).greedy(PROMPT, STEPS)
    assert runtime.load(art).generate(PROMPT, STEPS) == want


@pytest.mark.parametrize("options", [pytest.param(dict(quant="w8"), marks=pytest.mark.slow),
                                     pytest.param(dict(quant="w4", group_size=32, zero_point=True),
                                                  marks=pytest.mark.slow),
                                     dict(quant="w4", group_size=64, kv_cache="int8")],
                         ids=["w8", "w4-g32-zero-point", "w4-g64-int8-kv"])
def test_quantized_matches_the_cpu_target(options, gpu, artifacts, rng):
    """The same quantized weights (and int8 KV cache) give the TVM CPU kernels' logits with f32
    activations: both dequantize in registers, in f32 (`quantized_tolerance`)."""
    prompt = rng.integers(0, 256, 6).tolist()
    want_tokens, want_logits = _greedy(runtime.load(artifacts("llama-tiny", activations="f32", **options)),
                                       prompt, STEPS)
    tokens, logits = _greedy(runtime.load(gpu("llama-tiny", **options)), prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < quantized_tolerance(options), step


@pytest.mark.parametrize("name", _some_slow(["llama-tiny", "gpt2-tiny", "phi-tiny"], ("llama-tiny",)))
def test_fp16_weights_keep_logits_within_half_precision(name, gpu, rng):
    """`--dtype fp16`: f16 GEMM weights (each rounded to 11 significant bits), read from their
    bits and multiplied in f32, everything else f32: the logits stay within 1e-2 of
    onnxruntime's fp32 ones, teacher-forced with its tokens (an f16 near tie may pick another
    token), and the weights take half the bytes."""
    art = gpu(name, dtype="fp16")
    plans = open_artifact(art).manifest["plans"]
    assert "float16" in {plans["values"][w]["dtype"] for w in plans["weights"]}
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 6).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    _, logits = _greedy(runtime.load(art), prompt, STEPS, follow=want_tokens)
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < 1e-2, step


def test_metal_holds_the_opencl_kernels_as_metal_source(gpu):
    """One schedule, two languages: the metal artifact's plan and launch tables are the opencl
    one's, and every kernel the tables name is defined in each source."""
    metal, cl = (open_artifact(gpu("llama-tiny", target=t)) for t in ("metal", "opencl"))
    assert metal.manifest["plans"] == cl.manifest["plans"]
    assert metal.manifest["kernels"]["functions"] == cl.manifest["kernels"]["functions"]
    names = [k["name"] for g in cl.manifest["kernels"]["functions"].values() for k in g["kernels"]]
    metal_source = metal.file(metal.manifest["kernels"]["source"]).read_text()
    cl_source = cl.file(cl.manifest["kernels"]["source"]).read_text()
    assert metal_source.count("#include <metal_stdlib>") == 1  # one library
    for name in names:
        assert re.search(rf"\bkernel void {name}\(", metal_source), name
        assert re.search(rf"__kernel void {name}\(", cl_source), name


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True)


def test_llmc_run_on_an_opencl_device(gpu):
    art = gpu("gpt2-tiny")
    out = _cli("run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--device", "0", "--json")
    assert out.returncode == 0, out.stderr
    want, _ = OnnxDecoder(export("gpt2-tiny", exporter="dynamo", kv_cache=True), art).greedy([1, 2, 3], 4)
    assert json.loads(out.stdout)["new_token_ids"] == want
    listed = _cli("devices")
    assert listed.returncode == 0 and listed.stdout.startswith("0: ")


@pytest.mark.parametrize("target,args,message", [
    ("metal", [], "runs on an Apple GPU"),
    ("opencl", ["--device", "7"], "--device 7: this machine has"),
    ("opencl", ["--interpret"], "--interpret runs a cuda artifact"),
])
def test_run_refuses_by_name(target, args, message, gpu):
    out = _cli("run", str(gpu("gpt2-tiny", target=target)), "--prompt-ids", "1,2,3", *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("options,message", [
    (dict(kv_cache="f16"), "supported: f32, int8"),
])
def test_compile_refuses_by_name(options, message, tmp_path):
    with pytest.raises(LlmcError, match=re.escape(message)):
        llmc.compile(export("gpt2-tiny", exporter="dynamo", kv_cache=True), target="opencl",
                     output=tmp_path / "m.llmc", max_seq_len=32, **options)


@pytest.mark.parametrize("kv_cache,layout", [("f32", "paged:4"),
                                             pytest.param("int8", "paged:8", marks=pytest.mark.slow)])
def test_paged_cache_gives_each_prompt_its_solo_tokens(kv_cache, layout, gpu, artifacts, rng):
    """`--kv-layout paged:N` on opencl: prompts of different lengths are prefilled one by one
    into a pool that grows (the caches reallocated and copied on the device), then decoded
    together, each at its own length; each gets the tokens the CPU target's contiguous artifact
    gives it alone (the end-to-end tests hold those to onnxruntime)."""
    model = runtime.load(gpu("llama-tiny", kv_cache=kv_cache, kv_layout=layout))
    alone = runtime.load(artifacts("llama-tiny", kv_cache=kv_cache, activations="f32"))
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 9, 6)]
    want = [alone.generate(p, 6) for p in prompts]
    assert model.generate(prompts, 6) == want
    assert model.executor.pages.capacity > len(prompts)  # from a block per sequence, grown


def test_a_kernel_table_naming_a_missing_buffer_is_refused(gpu, tmp_path):
    """The launch table is checked against the plan before anything runs."""
    import shutil

    from llmc.runtime.artifact import ArtifactError

    art = tmp_path / "bad.llmc"
    shutil.copytree(gpu("gpt2-tiny"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    group = next(iter(manifest["kernels"]["functions"].values()))
    group["kernels"][0]["args"][0] = 99
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"args\[0\]: buffer 99, but the plan's calls give"):
        runtime.load(art)


def test_metal_arguments_struct_has_the_c_layout():
    """The scalars of a Metal kernel go in one struct (TVM's `<kernel>_args_t`): packed as a C
    compiler lays it out, as ctypes does on this machine (both are the platform C ABI)."""
    import ctypes

    from llmc.runtime.metal import pack

    for types in (["int64", "int64"], ["int32", "int64", "int32"], ["int32"], ["int64", "int32"]):
        values = [np.dtype(t).type(i + 1) for i, t in enumerate(types)]

        class Args(ctypes.Structure):
            _fields_ = [(f"f{i}", ctypes.c_int64 if t == "int64" else ctypes.c_int32) for i, t in enumerate(types)]
        assert pack(values) == bytes(Args(*[int(v) for v in values])), types


@pytest.mark.slow
def test_every_kernel_of_the_half_billion_model_is_generated_for_both(tmp_path):
    """The ~0.5B model's kernels, as OpenCL C and as Metal, from one schedule each."""
    path = zoo.get("llama-0.5b").export()
    arts = {t: open_artifact(llmc.compile(path, target=t, output=tmp_path / f"{t}.llmc", max_seq_len=256))
            for t in ("opencl", "metal")}
    tables = {t: a.manifest["kernels"]["functions"] for t, a in arts.items()}
    assert tables["opencl"] == tables["metal"]
    ops = {step["kind"] for step in arts["opencl"].manifest["plans"]["forward"]}
    assert {"linear", "attention", "rope_cache", "injective"} <= ops
    for t, a in arts.items():
        source = a.file(a.manifest["kernels"]["source"]).read_text()
        for group in tables[t].values():
            for k in group["kernels"]:
                assert f"void {k['name']}(" in source, (t, k["name"])
    assert np.all([len(g["kernels"]) >= 1 for g in tables["opencl"].values()])
