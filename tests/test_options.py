"""Compile options: one frozen CompileOptions that every way in builds; each target's defaults
and checks are its backend's (`Backend.resolve`), and the driver knows no target."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from llmc import backends
from llmc.errors import LlmcError
from llmc.options import CompileOptions, QuantSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target,want", [
    ("cpu", {"dtype": "fp32", "kv_cache": "f32", "cpu": "native", "arch": None}),
    ("arm64", {"dtype": "fp32", "kv_cache": "f32", "cpu": "generic", "arch": None, "activations": "f32"}),
    ("cuda", {"dtype": "fp16", "kv_cache": "f16", "cpu": None, "arch": "sm_80,sm_90", "activations": "f32"}),
    ("opencl", {"dtype": "fp32", "kv_cache": "f32", "cpu": None, "arch": None, "activations": "f32"}),
])
def test_each_backend_fills_its_target_defaults(target, want):
    resolved = CompileOptions(target=target).resolved()
    assert {k: getattr(resolved, k) for k in want} == want
    assert resolved.activations in ("int8", "f32")
    assert resolved.resolved() == resolved  # resolving twice changes nothing


def test_cuda_keeps_an_f32_cache_for_f32_weights():
    assert CompileOptions(target="cuda", dtype="fp32").resolved().kv_cache == "f32"


@pytest.mark.parametrize("options,message", [
    ({"target": "cpu", "arch": "sm_90"}, "--arch sm_90: GPU architectures are the cuda target's"),
    ({"target": "cuda", "cpu": "native"}, "--cpu native: the cuda target takes GPU architectures"),
    ({"target": "opencl", "cpu": "native"}, "the opencl target runs on whichever GPU"),
    ({"target": "cpu", "dtype": "fp16"}, "--dtype fp16: CPU targets compute in fp32"),
    ({"target": "cuda", "activations": "int8"}, "the cuda target's kernels take f32 activations"),
    ({"target": "cuda", "arch": "sm_70"}, "--arch 'sm_70': supported architectures are"),
    ({"target": "metal", "kv_cache": "f16"}, "KV cache 'f16' is not supported on metal"),
    ({"target": "arm64", "cpu": "native"}, "CPU 'native' is not supported for this target"),
])
def test_a_backend_refuses_what_its_target_cannot_honor(options, message):
    with pytest.raises(LlmcError, match=re.escape(message)):
        CompileOptions(**options).resolved()


@pytest.mark.parametrize("keywords,message", [
    ({"target": "tpu"}, "target 'tpu' is not supported yet; supported: cpu, arm64, cuda, opencl, metal"),
    ({"kv_layout": "paged:0"}, "--kv-layout paged:0: N, the tokens of a block"),
    ({"tune_budget": 0}, "--tune-budget 0: the budget must be a positive number"),
    ({"max_seq_len": 0}, "--max-seq-len 0: the context must be at least one token"),
    ({"quant": "w4", "group_size": 48}, "group size 48 is not supported; supported: 32, 64, 128"),
    ({"quant": "w8", "lm_head": "w2"}, "LM head encoding 'w2' is not supported"),
    ({"quant": "w8", "awq": True}, "--awq, --calibration-ids and --calibration-text apply to --quant w4"),
    ({"quant": "w4", "calibration": [1, 2]}, "calibrate --awq: add it"),
    ({"quant": "w4", "awq": True, "calibration": [1], "calibration_text": "a.txt"}, "not both"),
    ({"zero_point": True}, "apply with --quant"),
])
def test_options_every_target_shares_are_checked_when_made(keywords, message):
    with pytest.raises(LlmcError, match=re.escape(message)):
        CompileOptions.of(**keywords)


def test_flat_keywords_make_a_quant_spec_and_the_options_are_frozen():
    options = CompileOptions.of(quant="w4", group_size=32, awq=True, calibration=[5, 6, 7])
    assert options.quant == QuantSpec("w4", 32, awq=True, calibration=(5, 6, 7))
    assert options.quant.lm_head == "w8" and options.quant.embedding == "w8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.target = "cuda"
    assert options.with_quant(calibration=None).quant.calibration is None


def test_no_driver_pass_or_cli_names_a_target_value():
    """Targets are the backends' table: the driver and the passes take what a backend resolved."""
    for folder in ("compiler", "passes"):
        for path in (ROOT / folder).rglob("*.py"):
            if "tools" in path.parts or path.name == "cli.py":
                continue  # the CLI's flag help and the benchmark tools name targets to the user
            text = path.read_text()
            assert '"cuda"' not in text and '"sm_80' not in text, path
    assert set(backends.BACKENDS) == {"cpu", "arm64", "cuda", "opencl", "metal"}
