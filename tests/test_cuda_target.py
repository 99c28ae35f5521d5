"""The cuda target, proven without a GPU (TRITON_INTERPRET=1, set by conftest): every zoo decoder
family compiled for cuda and run under Triton's interpreter (`llmc run --interpret`) gives
onnxruntime's greedy tokens in fp32 and its logits within the stated tolerances; quantized
weights and the int8 KV cache give the CPU target's results; the cubins take exactly the
parameters the CUDA executor passes; the ~0.5B model's kernels compile for sm_80 and sm_90."""

from __future__ import annotations

import ctypes.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import rel_err
from onnx_reference import OnnxDecoder, at_accuracy_level_0
from zoo_cases import compiler, export

import llmc
from llmc import runtime, zoo
from llmc.runtime.artifact import open_artifact

STEPS = 4
ARCH = "sm_90"  # one architecture where the test is about the results; both where it is about the cubins


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    return compiler(tmp_path_factory.mktemp("cuda"), "cuda", arch=ARCH)


def quantized_tolerance(options: dict) -> float:
    """The logits' tolerance between two targets' kernels with the same quantized weights: f32
    rounding; with an int8 KV cache, one step of one cached value too (a key or value within f32
    rounding of a step's boundary rounds either way: prompts 87, 219 and 333 of 340 in the opencl
    target's test moved the logits by 1.6e-4 to 4.2e-4 from the step it happened at)."""
    return 1e-3 if options.get("kv_cache") == "int8" else 1e-5


def _greedy(model, prompt, steps, follow=None):
    """Greedy tokens and the last position's logits at each step (the interpreter is slow: one
    pass gives both). With `follow` (another system's tokens), each step is fed those instead
    of its own, so its logits compare with that system's even where a near tie went the other
    way."""
    model.executor.reset(batch=1)
    logits = model.forward(np.array([prompt]), past=0, last_only=True)[0, -1].copy()
    tokens, seen = [], [logits]
    for i in range(steps):
        tokens.append(int(seen[-1].argmax()))
        if i + 1 < steps:
            fed = follow[i] if follow is not None else tokens[-1]
            seen.append(model.forward(np.array([[fed]]), past=len(prompt) + i)[0, -1].copy())
    return tokens, seen


# the first families run by default, the rest with the slow tests (every one in CI)
def _some_slow(names, fast):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _some_slow([m.name for m in zoo.TINY_DECODERS], ("llama-tiny", "gpt2-tiny")))
def test_fp32_interpreted_gives_onnxruntime_tokens_and_logits(name, cuda, rng):
    art = cuda(name, dtype="fp32", kv_cache="f32")
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 6).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    tokens, logits = _greedy(runtime.load(art, interpret=True), prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < 1e-5, step  # the kernels' own f32 tolerance


@pytest.mark.parametrize("name", _some_slow(["llama-tiny", "gpt2-tiny", "phi-tiny"], ("llama-tiny",)))
def test_fp16_interpreted_logits_within_half_precision(name, cuda, rng):
    """f16 weights (each rounded to 11 significant bits, a relative error up to 2^-12), GEMM and
    attention operands rounded to f16 on the tensor-core path, and an f16 KV cache: the logits stay
    within 1e-2 of onnxruntime's fp32 ones (measured: at most 2e-3 on these models)."""
    art = cuda(name)  # the cuda defaults: fp16 weights, f16 KV cache
    m = open_artifact(art).manifest
    assert m["target"]["dtype"] == "fp16" and m["model"]["kv_cache"]["dtype"] == "f16"
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, 6).tolist()
    want_tokens, want_logits = OnnxDecoder(export(name, exporter="dynamo", kv_cache=True), art).greedy(prompt, STEPS)
    # teacher-forced with onnxruntime's tokens: an f16 near tie may pick another token, after
    # which the two systems' logits are of different inputs (seed 2060154277 did, at step 0)
    _, logits = _greedy(runtime.load(art, interpret=True), prompt, STEPS, follow=want_tokens)
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < 1e-2, step


@pytest.mark.parametrize("options", [pytest.param(dict(quant="w8"), marks=pytest.mark.slow),
                                     pytest.param(dict(quant="w4", group_size=32, zero_point=True), marks=pytest.mark.slow),
                                     pytest.param(dict(quant="w4", group_size=64, kv_cache="int8"),
                                                  marks=pytest.mark.slow)],
                         ids=["w8", "w4-g32-zero-point", "w4-g64-int8-kv"])
def test_quantized_interpreted_matches_the_cpu_target(options, cuda, artifacts, rng):
    """The same quantized weights (w8, w4 with and without zero points, the int8 KV cache) give the
    TVM kernels' logits on the CPU with f32 activations: both dequantize in registers, in f32."""
    name = "llama-tiny"
    art = cuda(name, dtype="fp32", **{"kv_cache": "f32", **options})
    prompt = rng.integers(0, 256, 6).tolist()
    want_tokens, want_logits = _greedy(runtime.load(artifacts(name, activations="f32", **options)), prompt, STEPS)
    tokens, logits = _greedy(runtime.load(art, interpret=True), prompt, STEPS)
    assert tokens == want_tokens
    for step in range(STEPS):
        assert rel_err(logits[step], want_logits[step]) < quantized_tolerance(options), step


@pytest.mark.parametrize("kv_cache", ["f32", pytest.param("int8", marks=pytest.mark.slow)])
def test_paged_cache_interpreted_gives_each_prompt_its_solo_tokens(kv_cache, cuda, artifacts, rng):
    """`--kv-layout paged:4` on cuda, under the interpreter: prompts of different lengths are
    prefilled one by one into a pool that grows, then decoded together, each at its own length
    (the kernels read each sequence's blocks and length); each gets the tokens the CPU target's
    contiguous artifact gives it alone (the end-to-end tests hold those to onnxruntime)."""
    art = cuda("llama-tiny", dtype="fp32", kv_cache=kv_cache, kv_layout="paged:4")
    assert open_artifact(art).manifest["model"]["kv_cache"]["layout"]["page_tokens"] == 4
    model = runtime.load(art, interpret=True)
    alone = runtime.load(artifacts("llama-tiny", kv_cache=kv_cache, activations="f32"))
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 6)]
    want = [alone.generate(p, 3) for p in prompts]  # two decode steps (the interpreter is slow)
    assert model.generate(prompts, 3) == want
    assert model.executor.pages.capacity > len(prompts)  # from a block per sequence, grown


def _kernel_parameters(cubin: Path) -> list[int]:
    """The sizes of a cubin's kernel parameters, in order, from its ELF (cuobjdump, which the
    Triton package ships)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "-elf", str(cubin)], capture_output=True, text=True, check=True).stdout
    params = {int(o, 16): int(s, 16) for o, s in re.findall(r"Ordinal : 0x([0-9a-f]+)\s+Offset\s*: 0x[0-9a-f]+\s+"
                                                            r"Size\s*: 0x([0-9a-f]+)", text)}
    return [params[i] for i in range(len(params))]


def test_cubins_take_the_parameters_the_cuda_executor_passes(cuda):
    """For every kernel and architecture: a 64-bit pointer per plan argument, D, batch and seq (32
    bits each), and the scratch pointers Triton appends; what `runtime.cuda` packs."""
    art = cuda("llama-tiny", arch="sm_80,sm_90")
    m = open_artifact(art).manifest
    assert m["kernels"]["archs"] == ["sm_80", "sm_90"]
    kernels = m["kernels"]["functions"]
    args = {s["kernel"]: len(s["args"]) for s in m["plans"]["forward"]}
    args.update({k["decode"]["kernel"]: args[name] for name, k in kernels.items() if k["decode"]})
    args[m["kernels"]["argmax"]] = 2  # the logits and the tokens
    assert set(args) == set(kernels)
    for name, k in kernels.items():
        n = args[name]
        assert k["signature"][n:] == ["*i32", "i32", "i32"]
        for arch, binary in k["binaries"].items():
            want = [8] * n + [8, 4, 4] + [8] * binary["scratch_args"]
            assert _kernel_parameters(art / binary["cubin"]) == want, (name, arch)


@pytest.mark.slow
def test_every_kernel_of_the_half_billion_model_compiles_for_sm80_and_sm90(tmp_path):
    path = zoo.get("llama-0.5b").export()
    art = llmc.compile(path, target="cuda", output=tmp_path / "half.llmc", max_seq_len=1024)
    m = open_artifact(art).manifest  # verified: schema, files, checksums
    kernels = m["kernels"]["functions"]
    assert m["kernels"]["archs"] == ["sm_80", "sm_90"]
    assert all(set(k["binaries"]) == {"sm_80", "sm_90"} for k in kernels.values())
    assert {k["module"] for k in kernels.values()} >= {"linear", "attention", "rope_cache", "generated"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True)


@pytest.mark.slow  # 12 s; the interpreter runs in-process in the default run's other tests
def test_run_interpret_from_the_command_line(cuda):
    art = cuda("gpt2-tiny", dtype="fp32", kv_cache="f32")
    out = _cli("run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--interpret", "--json")
    assert out.returncode == 0, out.stderr
    want, _ = OnnxDecoder(export("gpt2-tiny", exporter="dynamo", kv_cache=True), art).greedy([1, 2, 3], 3)
    assert json.loads(out.stdout)["new_token_ids"] == want


def test_a_cuda_artifact_needs_a_gpu_or_the_interpreter(cuda):
    out = _cli("run", str(cuda("gpt2-tiny", dtype="fp32", kv_cache="f32")), "--prompt-ids", "1,2,3")
    if ctypes.util.find_library("cuda"):  # a machine with the NVIDIA driver runs it
        assert out.returncode == 0, out.stderr
    else:
        assert out.returncode == 2 and "--interpret" in out.stderr and "Traceback" not in out.stderr


def test_interpret_refuses_a_cpu_artifact(artifacts):
    out = _cli("run", str(artifacts("gpt2-tiny")), "--prompt-ids", "1,2,3", "--interpret")
    assert out.returncode == 2 and "cuda artifact" in out.stderr


def test_bad_cuda_options_are_named(tmp_path):
    path = export("gpt2-tiny", exporter="dynamo", kv_cache=True)
    for args, words in [(["--target", "cuda", "--arch", "sm_75"], "sm_75"),
                        (["--target", "cpu", "--dtype", "fp16"], "fp16"),
                        (["--target", "cuda", "--kv-cache", "f16", "--dtype", "fp32"], None)]:
        out = _cli("compile", str(path), "-o", str(tmp_path / "x.llmc"), *args)
        if words is None:
            assert out.returncode == 0, out.stderr
        else:
            assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


THIRD_PARTY = Path(__file__).parent / "fixtures" / "third_party"


@pytest.mark.parametrize("name", _some_slow(["optimum-qwen2", "genai-llama-int4", "optimum-phi3", "optimum-gpt2",
                                             "genai-qwen2-fp32"], ("optimum-qwen2",)))
def test_third_party_exports_interpreted_give_onnxruntime_tokens(name, tmp_path, rng):
    """Files nobody here exported the graph of (optimum, onnxruntime-genai's builder, fp32 and
    4-bit MatMulNBits) compile for cuda and give onnxruntime's greedy tokens."""
    path = THIRD_PARTY / name / "model.onnx"
    art = llmc.compile(path, target="cuda", output=tmp_path / "m.llmc", max_seq_len=64, dtype="fp32",
                       kv_cache="f32", arch=ARCH)
    prompt = rng.integers(0, 256, 5).tolist()
    # onnxruntime with 4-bit weights and f32 activations, as these kernels compute
    reference = at_accuracy_level_0(path, tmp_path) if name.endswith("int4") else path
    want, want_logits = OnnxDecoder(reference, art).greedy(prompt, STEPS)
    got, logits = _greedy(runtime.load(art, interpret=True), prompt, STEPS, follow=want)
    for step, (ours, theirs) in enumerate(zip(logits, want_logits)):
        assert rel_err(ours, theirs) < 1e-4, step
    # onnxruntime's tokens, except where its own two best logits tie (random weights)
    for step, (g, w) in enumerate(zip(got, want)):
        gap = float(want_logits[step][w] - want_logits[step][g])
        assert gap <= 1e-4 * float(np.abs(want_logits[step]).max()), (step, g, w)
