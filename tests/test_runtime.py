"""The runtime in a process of its own: its kernel threads, its memory plan, and its peak memory
against what `llmc inspect` predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from zoo_cases import export

import llmc.runtime
from llmc.cli import main
from llmc.runtime import memory

CORES = len(os.sched_getaffinity(0))


def _fresh(code: str, **env) -> str:
    """Run `code` in a process that never imported the compiler, with only `env` choosing threads."""
    base = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "LLMC_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("how,env,want", [
    ("", {}, CORES),                       # every core by default
    ("threads=1", {}, 1),                  # load(..., threads=)
    ("", {"LLMC_NUM_THREADS": "1"}, 1),    # the environment
])
def test_kernel_threads(artifacts, how, env, want):
    code = f"import llmc.runtime as r; m = r.load({str(artifacts('llama-tiny'))!r}, {how}); print(m.threads)"
    assert int(_fresh(code, **env)) == want


_KERNEL_RUNTIME = """
import os, sys, llmc.runtime as r
m = r.load(sys.argv[1], threads={threads})
tokens = m.generate([3, 1, 4, 1, 5], 8)
maps = open("/proc/self/maps").read()
print(tokens, "tvm" in sys.modules or "tvm_ffi" in sys.modules, "libtvm" in maps, "libllmc" in maps)
"""


def test_cpu_artifacts_run_on_libllmc_without_tvm(artifacts):
    """The Python runtime runs a CPU artifact on the native runtime's loader and thread pool:
    neither TVM nor tvm-ffi is imported or mapped, and two threads give one thread's tokens."""
    runs = []
    for threads in (1, 2):
        done = subprocess.run([sys.executable, "-c", _KERNEL_RUNTIME.format(threads=threads),
                               str(artifacts("llama-tiny"))], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        *tokens, tvm, libtvm, libllmc = done.stdout.split()
        assert (tvm, libtvm, libllmc) == ("False", "False", "True")
        runs.append(tokens)
    assert runs[0] == runs[1]


def test_spin_time_is_a_knob_that_changes_no_token(artifacts):
    """LLMC_SPIN_US: how long the kernels' threads wait for work before they sleep. Sleeping at
    once (0) or spinning long gives the same tokens; a value that is not microseconds is named."""
    code = _KERNEL_RUNTIME.format(threads=2)
    runs = [_fresh(code.replace("sys.argv[1]", repr(str(artifacts("llama-tiny")))), LLMC_SPIN_US=spin).split()[:-3]
            for spin in ("0", "100000")]
    assert runs[0] == runs[1]
    bad = subprocess.run([sys.executable, "-c", code, str(artifacts("llama-tiny"))], capture_output=True, text=True,
                         env={**os.environ, "LLMC_SPIN_US": "soon"})
    assert bad.returncode != 0 and "LLMC_SPIN_US=soon: expected the microseconds" in bad.stderr


def test_a_later_model_may_use_fewer_threads_and_a_forked_child_runs(artifacts):
    """The pool starts once per process with the first model's threads; a later model with fewer
    gets them (and the same tokens); a forked child (no worker threads of its own) runs serially."""
    code = f"""
import os, llmc.runtime as r
art = {str(artifacts("llama-tiny"))!r}
a = r.load(art, threads=2)
want = a.generate([3, 1, 4], 6)
b = r.load(art, threads=1)
print(a.threads, b.threads, b.generate([3, 1, 4], 6) == want)
pid = os.fork()
if pid == 0:
    os._exit(0 if a.generate([3, 1, 4], 6) == want else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    assert _fresh(code).split() == [str(min(2, CORES)), "1", "True", "0"]


def test_weights_are_read_into_memory_not_used_from_the_file(artifacts, tmp_path):
    """A CPU model reads its weights into memory: the artifact rewritten or truncated under it
    (a recompile to the same path) changes nothing about the running model."""
    import shutil

    art = tmp_path / "m.llmc"
    shutil.copytree(artifacts("llama-tiny"), art)
    model = llmc.runtime.load(art, threads=1)
    want = model.generate([3, 1, 4], 6)
    weights = art / "weights.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
        f.truncate(size)  # the second half now reads as zeros
    assert model.generate([3, 1, 4], 6) == want


def test_a_missing_or_broken_libllmc_is_named(artifacts, tmp_path, monkeypatch):
    from llmc.runtime import kernels
    from llmc.runtime.errors import LlmcError

    art = artifacts("llama-tiny")
    for path, why in [(tmp_path / "libllmc.so", "is not built"), (tmp_path / "broken.so", "cannot load libllmc")]:
        if path.name == "broken.so":
            path.write_bytes(b"not a library")
        monkeypatch.setattr(kernels, "library_path", lambda path=path: path)
        kernels.library.cache_clear()
        try:
            with pytest.raises(LlmcError, match=why) as e:
                llmc.runtime.load(art)
            assert str(path) in str(e.value)
        finally:
            kernels.library.cache_clear()


def test_arena_planner_never_overlaps_live_values(rng):
    n = 60
    sizes = {f"v{i}": int(rng.integers(1, 5000)) for i in range(n)}
    lives = {}
    for name in sizes:
        a = int(rng.integers(-1, 40))
        lives[name] = (a, a + int(rng.integers(0, 8)))
    offsets, total = memory.assign(sizes, lives)
    for a in sizes:
        assert offsets[a] % memory.ALIGN == 0
        for b in sizes:
            if a < b and lives[a][0] <= lives[b][1] and lives[b][0] <= lives[a][1]:
                assert offsets[a] + sizes[a] <= offsets[b] or offsets[b] + sizes[b] <= offsets[a], (a, b)
    assert max(offsets[v] + sizes[v] for v in sizes) <= total < sum(sizes.values()) + n * memory.ALIGN


def test_arena_shares_memory_between_values(artifacts):
    from llmc.runtime.artifact import open_artifact

    m = open_artifact(artifacts("llama-tiny")).manifest
    weights = set(json.loads(_header(artifacts("llama-tiny"))))
    names = memory.arena_names(m, weights)
    env = {"batch": 1, "seq": 128, "past": 128, "total": 128}
    one_each = sum(memory.nbytes(m["plans"]["values"][n], env) for n in names)
    _, _, arena = memory.arena_plan(m, weights, 1)
    assert arena < one_each / 2, (arena, one_each)


def _header(artifact) -> bytes:
    data = (artifact / "weights.safetensors").read_bytes()
    return data[8:8 + int.from_bytes(data[:8], "little")]


def _peak(artifact, capsys, prompt, new):
    """(measured peak rise while generating, the footprint `llmc inspect` prints)."""
    from llmc.cli import _bytes
    from llmc.tools.peak_memory import measure

    result = measure(artifact, prompt, new)
    predicted = result["predicted"]
    assert main(["inspect", str(artifact)]) == 0
    assert f"total        {_bytes(predicted['total'])}" in capsys.readouterr().out
    return result["generate"], predicted


def test_peak_memory_is_what_inspect_predicts(artifacts, capsys):
    measured, predicted = _peak(artifacts("llama-tiny"), capsys, 16, 16)
    # the target: weights + KV cache + 10% + 50 MB
    assert measured <= (predicted["weights"] + predicted["kv_cache"]) * 1.1 + 50e6, (measured, predicted)


@pytest.mark.slow
def test_peak_memory_of_a_realistic_model(tmp_path, capsys):
    """GPT-2 124M (498 MB of weights): the weights are mapped, not copied, and the rest is what
    the plan says."""
    import llmc

    art = llmc.compile(export("gpt2-124m", exporter="dynamo", kv_cache=True), output=tmp_path / "g.llmc",
                       max_seq_len=256)
    measured, predicted = _peak(art, capsys, 128, 128)
    assert measured <= (predicted["weights"] + predicted["kv_cache"]) * 1.1 + 50e6, (measured, predicted)
    assert measured <= predicted["total"] + 50e6, (measured, predicted)
    # every GEMM weight is read while generating; of the token table only the prompt's rows
    assert measured >= 0.7 * predicted["weights"], (measured, predicted)


def test_dim_expressions_evaluate_and_anything_else_is_refused():
    """Plan dims whose atoms are expressions (an export of last-position logits has
    `min(seq, 1)`) are parsed by a small grammar; anything else, code included, is refused."""
    from llmc.runtime.dims import BadDim, evaluate, parse

    env = {"batch": 2, "seq": 5, "past": 3, "total": 8}
    cases = {"min(seq, 1)": 1, "(seq + 3)//4": 2, "max(past - 7, 0)": 0, "2*batch*min(seq, 1) - -1": 5,
             "-seq + 10": 5, "total": 8}
    for text, want in cases.items():
        assert evaluate([[3, [text]]], env) == 3 * want, text
    for bad in ("__import__('os')", "seq +", "min(seq)", "x", "seq ** 2", "1; 2"):
        with pytest.raises(BadDim):
            parse(bad)
