"""The native runtime (runtime/native/, C): built here with the project's toolchain, it must give
exactly the Python runtime's tokens (greedy and seeded sampling), refuse bad input with exit 2,
and, built for arm64 and run under emulation (qemu-user), give the tokens x86 gives.

The arm64 tests need Debian's qemu-user, libc6-arm64-cross and binutils-aarch64-linux-gnu
(scripts/setup.sh installs them as root) and PyPI's ziglang (the `cross` extra)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from zoo_cases import compiler, export

from llmc import runtime, toolchain
from llmc.cli import main
from llmc.runtime.cpu import arch as host_arch
from llmc.zoo import TINY_DECODERS

PROMPT = [3, 17, 5, 9, 2, 11]
ENCODINGS = {"fp32": {}, "w8": {"quant": "w8"}, "w4": {"quant": "w4", "group_size": 32}, "kv-int8": {"kv_cache": "int8"},
             "kv-int8-bshd": {"kv_cache": "int8", "kv_layout": "bshd"}, "paged": {"kv_layout": "paged:4"},
             "kv-int8-paged": {"kv_cache": "int8", "kv_layout": "paged:8"}}
# every encoding of llama-tiny but one and two of gpt2-tiny run by default, all of every family
# with the slow tests (CI)
DEFAULT = {("llama-tiny", e) for e in ENCODINGS if e != "kv-int8-paged"} | {("gpt2-tiny", "fp32"), ("gpt2-tiny", "w4")}
CASES = [(m.name, e) if (m.name, e) in DEFAULT else pytest.param(m.name, e, marks=pytest.mark.slow)
         for m in TINY_DECODERS for e in ENCODINGS]
SYSROOT = "/usr/aarch64-linux-gnu"


@pytest.fixture(scope="session")
def native_arm64(tmp_path_factory):
    """llmc-run for aarch64, and the command prefix that runs aarch64 programs here."""
    for tool, package in (("qemu-aarch64", "qemu-user"), (f"{SYSROOT}/lib/ld-linux-aarch64.so.1", "libc6-arm64-cross")):
        assert shutil.which(tool) or os.path.exists(tool), \
            f"{tool} is missing: apt-get install {package} (scripts/setup.sh does, as root)"
    program = toolchain.build_runtime("aarch64", tmp_path_factory.mktemp("arm64") / "llmc-run")
    return ["qemu-aarch64", "-L", SYSROOT, str(program)]


@pytest.fixture(scope="session")
def arm64_artifacts(tmp_path_factory):
    return compiler(tmp_path_factory.mktemp("arm64-artifacts"), "arm64")


def run(command, artifact, *args, check=True):
    done = subprocess.run([*map(str, command), str(artifact), *map(str, args)], capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stderr
        return [int(t) for t in done.stdout.split()]
    return done


def options(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.mark.parametrize("name,encoding", CASES)
def test_greedy_tokens_equal_the_python_runtime(native, artifacts, name, encoding):
    art = artifacts(name, **ENCODINGS[encoding])
    want = runtime.load(art).generate(PROMPT, 24)
    assert run([native], art, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 24) == want


@pytest.mark.parametrize("name,encoding", [("llama-tiny", "fp32"), ("gpt2-tiny", "w4")])
def test_seeded_sampling_equals_the_python_runtime(native, artifacts, name, encoding, rng):
    art = artifacts(name, **ENCODINGS[encoding])
    model = runtime.load(art)
    seed = int(rng.integers(0, 2**63))
    for kw in (dict(temperature=0.9, top_k=5, top_p=0.95), dict(temperature=1.3), dict(temperature=0.7, top_p=0.5)):
        want = model.generate(PROMPT, 32, seed=seed, **kw)
        got = run([native], art, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", 32,
                  *options(seed=seed, **kw))
        assert got == want, (kw, seed)


def test_json_output_eos_and_stats(native, artifacts):
    art = artifacts("llama-tiny")
    tokens = runtime.load(art).generate(PROMPT, 12)
    done = run([native], art, "--prompt-ids", "3,17,5,9,2,11", "--max-new-tokens", 12, "--json", "--stats",
               check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["prompt_ids"] == PROMPT and out["new_token_ids"] == tokens
    stats = done.stderr
    assert re.search(r"decode 11 steps .* outside kernels\), \d+ threads; weights \d+ B, KV cache \d+ B", stats), stats


C_API_CLIENT = """
import ctypes, json, sys

class Sampling(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_double), ("top_k", ctypes.c_int), ("top_p", ctypes.c_double),
                ("seed", ctypes.c_uint64), ("seeded", ctypes.c_int)]

class Stats(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_double) for n in ("load", "prefill", "decode", "decode_kernels")]
                + [(n, ctypes.c_int) for n in ("prompt_tokens", "new_tokens", "decode_steps", "threads")]
                + [(n, ctypes.c_size_t) for n in ("weights_bytes", "kv_cache_bytes", "activation_bytes")]
                + [(n, ctypes.c_int) for n in ("max_seq_len", "vocab_size")])

lib = ctypes.CDLL(sys.argv[1])  # RTLD_LOCAL, as apps load libraries
callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_void_p)
lib.llmc_load.restype = ctypes.c_void_p
lib.llmc_load.argtypes = [ctypes.c_char_p, ctypes.c_int]
lib.llmc_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int, ctypes.c_int,
                              ctypes.POINTER(Sampling), callback, ctypes.c_void_p]
lib.llmc_get_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(Stats)]
lib.llmc_free.argtypes = [ctypes.c_void_p]
lib.llmc_last_error.restype = ctypes.c_char_p
out = {}
model = lib.llmc_load(sys.argv[2].encode(), 1)
assert model, lib.llmc_last_error()
seen = []
on_token = callback(lambda token, user: seen.append(token) or int(len(seen) == 6))  # stop after 6
prompt_ids = json.loads(sys.argv[3])
prompt = (ctypes.c_int32 * len(prompt_ids))(*prompt_ids)
out["returned"] = lib.llmc_generate(model, prompt, len(prompt_ids), 10, ctypes.byref(Sampling(0.0, 0, 1.0, 0, 1)),
                                    on_token, None)
out["seen"] = seen
stats = Stats()
lib.llmc_get_stats(model, ctypes.byref(stats))
out["stats"] = {name: getattr(stats, name) for name, _ in Stats._fields_}
out["bad"] = lib.llmc_generate(model, prompt, len(prompt_ids), 10, ctypes.byref(Sampling(-1.0, 0, 1.0, 0, 1)),
                               on_token, None)
out["bad_error"] = lib.llmc_last_error().decode()
lib.llmc_free(model)
out["missing"] = lib.llmc_load(b"/nonexistent/m.llmc", 1)
out["missing_error"] = lib.llmc_last_error().decode()
print(json.dumps(out))
"""


def test_c_api_as_a_library(tmp_path, artifacts):
    """libllmc.so through its C API, as an app binds it, in a process with nothing else loaded
    (no tvm_ffi to lend the kernels its symbols): load, generate with a per-token callback that
    stops early, stats, free, and the error text of a failed call."""
    lib = toolchain.build_runtime(host_arch(), tmp_path / "libllmc.so", shared=True)
    art = artifacts("gpt2-tiny")
    want = runtime.load(art).generate(PROMPT, 10)
    done = subprocess.run([sys.executable, "-c", C_API_CLIENT, str(lib), str(art), json.dumps(PROMPT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["returned"] == 6 and out["seen"] == want[:6]
    stats = out["stats"]
    assert (stats["prompt_tokens"], stats["new_tokens"], stats["threads"], stats["max_seq_len"]) == (6, 6, 1, 128)
    assert stats["weights_bytes"] == (art / "weights.safetensors").stat().st_size
    assert out["bad"] == -1 and "temperature -1: must be a finite number >= 0" in out["bad_error"]
    assert out["missing"] is None and "no such artifact" in out["missing_error"]


def _altered(art, tmp_path):
    copy = tmp_path / "altered.llmc"
    shutil.copytree(art, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    return copy


def _edited(art, tmp_path):
    copy = tmp_path / "edited.llmc"
    shutil.copytree(art, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["max_seq_len"] = 4096
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _resealed(change):
    """A copy of the artifact whose manifest `change` edits, with its checksum recomputed."""
    def make(art, tmp_path):
        from llmc.runtime.artifact import digest

        copy = tmp_path / "changed.llmc"
        shutil.copytree(art, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        change(manifest)
        manifest["manifest_sha256"] = digest(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy
    return make


_cuda = _resealed(lambda m: m.update(target={"kind": "cuda", "dtype": "fp16"}))
_paged = _resealed(lambda m: m["model"]["kv_cache"]["layout"].update(page_tokens=16))
_pages = _resealed(lambda m: m["model"]["kv_cache"]["layout"].update(page_tokens=5000))


def _misview(m):
    """A step's view of a value holding one row more than the value."""
    step = next(s for s in m["plans"]["forward"] if any(s["views"]))
    view = next(v for v in step["views"] if v)
    view[0] = view[0] + [[1, []]]


def _unread_slot(m):
    step = next(s for s in m["plans"]["forward"] if s["kind"] == "attention")
    step["args"][0], step["views"][0] = "", None


@pytest.mark.parametrize("make,args,message", [
    (_altered, ["--prompt-ids", "1,2"], "checksum mismatch (the file was altered after compilation)"),
    (_edited, ["--prompt-ids", "1,2"], "altered after compilation"),
    (_cuda, ["--prompt-ids", "1,2"], "a cuda artifact; the native runtime runs CPU artifacts"),
    (_paged, ["--prompt-ids", "1,2"], "plans.values['kv_cache.blocks']: a paged cache's kernels take it as int32"),
    (_pages, ["--prompt-ids", "1,2"], "page_tokens: expected an integer from 0 (contiguous) to 4096"),
    (_resealed(_misview), ["--prompt-ids", "1,2"], ".views[0]: the view of"),
    (_resealed(_unread_slot), ["--prompt-ids", "1,2"], "an unread slot (\"\"), which only a GPU plan has"),
    (None, ["--prompt-ids", "1,2", "--max-new-tokens", "127"], "exceeds the context of 128 tokens"),
    (None, ["--prompt-ids", "1,2", "--beam", "4"], "unknown option '--beam'"),
    (None, ["--prompt-ids", "1,256"], "token id 256 is outside the vocabulary (0..255)"),
    (None, ["--prompt-ids", "1,,2"], "expected comma-separated integer token ids"),
    (None, ["--prompt-ids", "1", "--top-p", "1.5"], "--top-p 1.5: must be a number in (0, 1]"),
    (None, ["--prompt-ids", "1", "--threads", "0"], "--threads 0: must be an integer >= 1"),
    (None, [], "--prompt-ids is required"),
])
def test_bad_input_is_a_message_and_exit_2(native, artifacts, tmp_path, make, args, message):
    art = artifacts("llama-tiny")
    done = run([native], make(art, tmp_path) if make else art, *args, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Segmentation" not in done.stderr


def test_wrong_architecture_is_refused_by_both_runtimes(native, arm64_artifacts, capsys):
    art = arm64_artifacts("llama-tiny")
    done = run([native], art, "--prompt-ids", "1,2", check=False)
    assert done.returncode == 2 and "compiled for aarch64 (generic); this machine is x86_64" in done.stderr
    assert main(["run", str(art), "--prompt-ids", "1,2"]) == 2
    assert "compiled for aarch64 (generic); this machine is x86_64" in capsys.readouterr().err


# (family, arm64 options): NEON only with f32 GEMMs, and the dot-product CPU with int8 ones
ARM64_CASES = [("llama-tiny", {}), pytest.param("qwen2-tiny", {"cpu": "cortex-a76", "quant": "w4", "group_size": 32},
                                                 marks=pytest.mark.slow),
               pytest.param("gpt2-tiny", {"cpu": "cortex-a76", "quant": "w8", "kv_cache": "int8"},
                            marks=pytest.mark.slow),
               pytest.param("phi-tiny", {"quant": "w8"}, marks=pytest.mark.slow),
               pytest.param("mistral-tiny", {"kv_layout": "paged:8"}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,arm", ARM64_CASES)
def test_arm64_under_emulation_gives_the_x86_tokens(native_arm64, artifacts, arm64_artifacts, name, arm):
    """The same encoding on x86 (generic arm64 has no integer dot product: f32 activations)."""
    x86 = {k: v for k, v in arm.items() if k != "cpu"}
    if "quant" in arm and "cpu" not in arm:
        x86["activations"] = "f32"
    want = runtime.load(artifacts(name, **x86)).generate(PROMPT, 20)
    got = run(native_arm64, arm64_artifacts(name, **arm), "--prompt-ids", ",".join(map(str, PROMPT)),
              "--max-new-tokens", 20)
    assert got == want


def _disassembly(art) -> dict[str, str]:
    """Each function's aarch64 disassembly in the artifact's kernel library."""
    objdump = "aarch64-linux-gnu-objdump"
    assert shutil.which(objdump), f"{objdump} is missing: apt-get install binutils-aarch64-linux-gnu"
    text = subprocess.run([objdump, "-d", str(art / "kernels" / "model.so")], capture_output=True, text=True,
                          check=True).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"^[0-9a-f]+ <([^>]+)>:\n(.*?)(?=\n\n|\Z)", text, re.S | re.M)}


def test_arm64_kernels_use_neon_and_dot_products(arm64_artifacts):
    gemms = [body for name, body in _disassembly(arm64_artifacts("llama-tiny")).items() if "fused_linear" in name]
    assert gemms and any(re.search(r"\bfmla\s+v\d+\.4s", body) for body in gemms)
    int8 = [body for name, body in _disassembly(arm64_artifacts("llama-tiny", cpu="cortex-a76", quant="w8")).items()
            if "fused_linear" in name]
    assert any(re.search(r"\bsdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b", body) for body in int8)


@pytest.mark.slow  # one more arm64 compile (5 s)
def test_generic_arm64_has_no_dot_products(arm64_artifacts):
    """Generic ARMv8 has no sdot: its quantized GEMMs dequantize (f32 activations)."""
    assert not any("sdot" in body for body in _disassembly(arm64_artifacts("llama-tiny", quant="w8")).values())


def test_package_runs_on_the_board(native_arm64, tmp_path, capsys):
    """`llmc package`: the program, the artifact (w4 g32 by default) and a README, runnable as is."""
    out = tmp_path / "pkg"
    assert main(["package", str(export("llama-tiny", exporter="dynamo", kv_cache=True)), "--cpu", "cortex-a76",
                 "--max-seq-len", "64", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "llmc-run", "model.llmc"]
    assert "./llmc-run model.llmc --prompt-ids" in (out / "README.txt").read_text()
    manifest = json.loads((out / "model.llmc" / "manifest.json").read_text())
    assert manifest["model"]["quant"]["scheme"] == "w4" and manifest["model"]["quant"]["group_size"] == 32
    got = run(["qemu-aarch64", "-L", SYSROOT, out / "llmc-run"], out / "model.llmc", "--prompt-ids", "1,2,3",
              "--max-new-tokens", 5)
    assert len(got) == 5
    # a folder llmc did not write is not replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["package", "model.onnx", "-o", str(other)]) == 2
    assert (other / "notes.txt").exists()
