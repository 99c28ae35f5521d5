"""Autotuning (`llmc.tuning`): measured configurations are cached, so a second compile measures
nothing; the budget is honored; tables export and import, and another machine's entries are
not used; a tuned artifact gives the default artifact's tokens; bad tables and impossible
requests are clear errors."""

from __future__ import annotations

import json
import logging
import time

import pytest
from conftest import run_cli
from zoo_cases import export

import llmc
from llmc import runtime, tuning
from llmc.cli import main
from llmc.options import CompileOptions
from llmc.backends.tvm import linear, measure
from llmc.backends.tvm.backend import HOST

PROMPT = [3, 17, 42, 9, 100, 7, 55]


def _tuning_of(artifact) -> dict:
    return json.loads((artifact / "manifest.json").read_text())["kernels"]["tuning"]


def _fast_tuning(monkeypatch, cache):
    """The tuning table at `cache`; fewer tiles and shorter timing rounds: these tests count
    measurements, they do not time."""
    monkeypatch.setenv("LLMC_TUNING_CACHE", str(cache))
    monkeypatch.setattr(measure, "ROUND_SECONDS", 0.001)
    monkeypatch.setattr(linear, "TILES", ("6x4", "4x1"))


def _compile(tmp_path, name, monkeypatch, cache, **options):
    _fast_tuning(monkeypatch, cache)
    return llmc.compile(export("llama-tiny", exporter="dynamo", kv_cache=True), output=tmp_path / name,
                        max_seq_len=64, **options)


def test_second_compile_measures_nothing(tmp_path, monkeypatch, artifacts):
    default = artifacts("llama-tiny")  # the session's, compiled with the defaults (before the table below)
    cache = tmp_path / "tuning.json"
    counts = []
    original = tuning.Tuner.finish

    def finish(self):  # count what each compile measured, and how long its tuning took
        counts.append((self.measurements, self.seconds))
        original(self)

    monkeypatch.setattr(tuning.Tuner, "finish", finish)
    first = _compile(tmp_path, "first.llmc", monkeypatch, cache, tune=True)
    second = _compile(tmp_path, "second.llmc", monkeypatch, cache, tune=True)
    *_, (measured, seconds), (again, seconds_again) = counts
    assert measured > 0 and again == 0 and seconds_again < seconds / 10
    tuned = _tuning_of(first)
    assert tuned and all(t["source"] == "measured" for t in tuned.values())
    assert {n: t["config"] for n, t in _tuning_of(second).items()} == {n: t["config"] for n, t in tuned.items()}
    assert all(t["source"] == "cache" for t in _tuning_of(second).values())
    assert all(t["source"] == "default" for t in _tuning_of(default).values())
    # the cache holds what was measured, keyed by this machine and version
    table = tuning.Table.load(cache)
    machine = HOST.machine(CompileOptions(cpu="native"))
    assert len(table.for_machine(machine)) == len({t["config"]["tile"] + n for n, t in tuned.items()}) >= 1
    want = runtime.load(default).generate(PROMPT, 8)
    assert runtime.load(first).generate(PROMPT, 8) == want


def test_budget_is_honored(tmp_path, monkeypatch):
    cache = tmp_path / "tuning.json"
    start = time.monotonic()
    art = _compile(tmp_path, "a.llmc", monkeypatch, cache, tune=True, tune_budget=0.05)
    assert time.monotonic() - start < 60
    sources = {t["source"] for t in _tuning_of(art).values()}
    assert sources <= {"partial", "default"} and "partial" in sources
    # nothing partial is cached: a later compile with a budget measures it
    assert not cache.exists() or not tuning.Table.load(cache).entries


@pytest.mark.slow  # 26 s: a tuning compile and two more
def test_export_and_import(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "tuning.json"
    exported = tmp_path / "fleet.json"
    _fast_tuning(monkeypatch, cache)
    # `llmc tune MODEL --export FILE`: tunes into the cache (no artifact kept), then exports
    model = str(export("llama-tiny", exporter="dynamo", kv_cache=True))
    assert main(["tune", model, "--max-seq-len", "64", "--export", str(exported)]) == 0
    entries = json.loads(exported.read_text())["entries"]
    assert len(entries) == len(tuning.Table.load(cache).entries) > 0
    assert run_cli("tune", "--export", str(tmp_path / "again.json")).returncode == 0  # the cache alone
    assert json.loads((tmp_path / "again.json").read_text())["entries"] == entries
    assert entries and all(e["machine"] == HOST.machine(CompileOptions(cpu="native")) for e in entries)
    # another machine: its table is used, nothing measured, the artifact records the source
    art = _compile(tmp_path, "b.llmc", monkeypatch, tmp_path / "fresh.json", tuning=[exported])
    assert {t["source"] for t in _tuning_of(art).values()} == {"file"}
    # a table of another CPU and of another llmc version: not used, and the user is told
    other = json.loads(exported.read_text())
    other["entries"] = [dict(e, machine=dict(e["machine"], model="another CPU")) for e in entries[:1]] + \
        [dict(e, llmc_version="0.0.1") for e in entries[1:]]
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(other))
    with caplog.at_level(logging.WARNING, logger="llmc.tuning"):
        art = _compile(tmp_path, "c.llmc", monkeypatch, tmp_path / "fresh.json", tuning=[foreign])
    assert {t["source"] for t in _tuning_of(art).values()} == {"default"}
    assert f"{len(entries)} of its {len(entries)} entries are for another machine or llmc version" in caplog.text
    # this machine's entries with a value the schedule does not take: not used, and said
    odd = json.loads(exported.read_text())
    odd["entries"] = [dict(e, config=dict(e["config"], tile="99x9")) for e in entries]
    foreign.write_text(json.dumps(odd))
    with caplog.at_level(logging.WARNING, logger="llmc.tuning"):
        art = _compile(tmp_path, "d.llmc", monkeypatch, tmp_path / "fresh.json", tuning=[foreign])
    assert {t["source"] for t in _tuning_of(art).values()} == {"default"}
    assert "tile=99x9" in caplog.text and "does not take" in caplog.text


@pytest.mark.parametrize("content,message", [
    ("{", "not a tuning table (not JSON"),
    ('{"format": "other"}', "not a tuning table (format is not 'llmc-tuning')"),
    ('{"format": "llmc-tuning", "version": 9, "entries": []}', "tuning table version 9"),
    ('{"format": "llmc-tuning", "version": 1, "entries": [{"kernel": "k", "machine": {}, "llmc_version": "x", '
     '"config": {"tile": [1]}, "seconds": {}}]}', "entries[0]: config.tile: expected a number or a string"),
])
def test_bad_tuning_table(tmp_path, content, message):
    table = tmp_path / "t.json"
    table.write_text(content)
    r = run_cli("compile", str(export("llama-tiny", exporter="dynamo", kv_cache=True)), "-o",
                str(tmp_path / "x.llmc"), "--tuning", str(table))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--target", "arm64", "--tune"], "--tune: the arm64 target is cross-compiled"),
    (["--target", "cuda", "--tune"], "--tune: timing Triton kernels needs an NVIDIA GPU"),
    (["--tune", "--tune-budget", "0"], "the budget must be a positive number of seconds"),
])
def test_tune_refused(tmp_path, args, message):
    r = run_cli("compile", str(export("llama-tiny", exporter="dynamo", kv_cache=True)), "-o",
                str(tmp_path / "x.llmc"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # 22 s: two cuda compiles and Triton's interpreter
def test_cuda_compile_uses_a_table_tuned_on_a_gpu(tmp_path, monkeypatch):
    """A table made on a GPU machine, used by a compile on this one (no GPU): the GEMMs get its
    block sizes, warps and stages in their launch table, and still compute the same tokens
    (under Triton's interpreter)."""
    default = _compile(tmp_path, "default.llmc", monkeypatch, tmp_path / "none.json", target="cuda", arch="sm_90",
                       dtype="fp32")
    tuned = _tuning_of(default)
    assert tuned and all(t["source"] == "default" for t in tuned.values())
    config = {"gemv_block_n": 8, "gemv_warps": 2, "gemm_tile": "32x64", "gemm_warps": 8, "gemm_stages": 2}
    table = tmp_path / "gpu.json"
    entries = [{"kernel": t["kernel"], "machine": {"gpu": "sm_90"}, "llmc_version": llmc.__version__,
                "config": config, "seconds": {}} for t in tuned.values()]
    tuning.Table(entries).save(table)
    art = _compile(tmp_path, "tuned.llmc", monkeypatch, tmp_path / "none.json", target="cuda", arch="sm_90",
                   dtype="fp32", tuning=[table])
    assert {t["source"] for t in _tuning_of(art).values()} == {"file"}
    functions = json.loads((art / "manifest.json").read_text())["kernels"]["functions"]
    for name in tuned:
        gemm, gemv = functions[name], functions[name + "_gemv"]
        assert (gemm["constexprs"]["BLOCK_M"], gemm["constexprs"]["BLOCK_N"]) == (32, 64)
        assert (gemm["num_warps"], gemm["num_stages"], gemv["constexprs"]["BLOCK_N"], gemv["num_warps"]) == (8, 2, 8, 2)
    want = runtime.load(default, interpret=True).generate(PROMPT, 4)
    assert runtime.load(art, interpret=True).generate(PROMPT, 4) == want
