"""The TVM `fused_linear` kernel against the op's numpy definition: every prologue/epilogue,
odd sizes (not multiples of the 16-lane vectors or the 64-feature tile), 1 row (decode), row
counts with and without a remainder after whole register blocks (prefill), fresh random data; and every fused_linear of a compiled Llama graph with
its real weights."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import tvm
from conftest import rel_err
from zoo_cases import export

import llmc
from llmc.backends.tvm.linear import PACKINGS, TILES, LinearSpec, build, default_tile, knobs, schedule
from llmc.backends.tvm.target import host
from llmc.ops import get_op
from llmc.passes.quantize_weights import quantize


ROWS = 6  # the default register tile's rows


def _run(spec, arrays, m, config=None, kernel=None):
    kernel = kernel or build(spec, host(), config)
    dev = tvm.cpu(0)
    args = [tvm.runtime.tensor(PACKINGS[spec.packing(a)](arrays[a]) if spec.packing(a) else arrays[a], dev)
            for a in spec.arg_names()[:-1]]
    out = tvm.runtime.tensor(np.zeros((m, spec.out_features), arrays["x"].dtype), dev)
    kernel["main"](*args, out)
    return out.numpy()


def _reference(spec, a):
    return get_op("fused_linear").ref(
        a["x"], a["w"], a.get("bias"), a.get("residual"), a.get("norm_scale"), a.get("norm_bias"), a.get("w_scale"),
        a.get("w_zero"), norm=spec.norm, epsilon=spec.epsilon, activation=spec.activation, gated=int(spec.gated),
        quant=spec.quant, group_size=spec.group_size, act_block=spec.act_block)


# Every prologue/epilogue combination once; sizes and row counts alternate between them.
CASES = [(LinearSpec(*((96, 100), (130, 70))[i % 2], bias=b, residual=r, norm=norm, activation=act, gated=g),
          (1, 2 * ROWS + 1, 5, ROWS)[i // 2 % 4])
         for i, (b, r, norm, (act, g)) in enumerate(itertools.product(
             [False, True], [False, True], ["", "rms", "layer"],
             [("", False), ("relu", False), ("gelu", False), ("gelu_tanh", False), ("silu", True)]))]


@pytest.mark.parametrize("spec,m", CASES, ids=lambda c: c if isinstance(c, int) else
                         f"{c.n}x{c.k}-b{int(c.bias)}r{int(c.residual)}-{c.norm or 'nonorm'}"
                         f"-{c.activation or 'id'}{'-gated' * c.gated}")
def test_kernel_matches_reference(spec, m, rng):
    a = {"x": rng.standard_normal((m, spec.k)), "w": rng.standard_normal((spec.n, spec.k)) / 8,
         "bias": rng.standard_normal(spec.n), "residual": rng.standard_normal((m, spec.out_features)),
         "norm_scale": rng.standard_normal(spec.k), "norm_bias": rng.standard_normal(spec.k)}
    a = {k: v.astype(np.float32) for k, v in a.items() if k in spec.arg_names()}
    assert rel_err(_run(spec, a, m), _reference(spec, a)) < 1e-5


# Quantized weights: w8 per channel, w4 in groups (symmetric, with zero points); odd output sizes,
# decode and prefill row counts, with a norm prologue and a gated epilogue once each.
QUANT_CASES = [(LinearSpec(130, 96, quant="w8"), False, 1), (LinearSpec(130, 96, quant="w8", bias=True), False, 13),
               (LinearSpec(70, 96, quant="w4", group_size=32), False, 1),
               (LinearSpec(70, 128, quant="w4", group_size=64, norm="rms"), True, 13),
               (LinearSpec(96, 64, quant="w4", group_size=32, gated=True, activation="silu"), True, 5)]


@pytest.mark.parametrize("spec,zero_point,m", QUANT_CASES, ids=lambda c: c if not isinstance(c, LinearSpec) else
                         f"{c.n}x{c.k}-{c.quant}-g{c.group_size}{'-' + c.norm if c.norm else ''}{'-gated' * c.gated}")
def test_quantized_kernel_matches_reference(spec, zero_point, m, rng):
    w = rng.standard_normal((spec.n, spec.k)).astype(np.float32) / 8
    q, scale, zero = quantize(w, spec.quant, spec.group_size, zero_point)
    a = {"x": rng.standard_normal((m, spec.k)), "w": q, "w_scale": scale, "w_zero": zero,
         "bias": rng.standard_normal(spec.n), "norm_scale": rng.standard_normal(spec.k)}
    a = {k: v if k == "w" else v.astype(np.float32) for k, v in a.items() if k in spec.arg_names()}
    want = _reference(spec, a)
    assert rel_err(_run(spec, a, m), want) < 1e-5
    # and the quantized weight is close to the original (the scheme's rounding error)
    full = dict(a, w=w, w_scale=None, w_zero=None)
    tolerance = 0.01 if spec.quant == "w8" else 0.3
    assert rel_err(want, _reference(replace(spec, quant="", group_size=0), full)) < tolerance


# Every value of every knob (`linear.knobs`), each with the other knobs at their defaults, on
# odd sizes: f32, w8 and w4 weights, decode (1 row) and prefill row counts below, at and past
# whole register tiles of each tile's rows.
KNOB_SPECS = [LinearSpec(130, 96, norm="rms", bias=True), LinearSpec(70, 96, quant="w8", residual=True),
              LinearSpec(96, 64, quant="w4", group_size=32, gated=True, activation="silu")]


@pytest.mark.parametrize("spec", [s if not s.quant else pytest.param(s, marks=pytest.mark.slow) for s in KNOB_SPECS],
                         ids=lambda c: c.quant or "f32")  # f32 by default, w8 and w4 with the slow tests
def test_every_knob_value_matches_reference(spec, rng):
    """All tiles, also those this CPU would not try (AVX-512's)."""
    w = rng.standard_normal((spec.n, spec.k)).astype(np.float32) / 8
    q, scale, zero = quantize(w, spec.quant, spec.group_size, True) if spec.quant else (w, None, None)
    for knob in knobs(spec, (32, 16)):
        for value in knob.values:
            config = {knob.name: value}
            kernel = build(spec, host(), config)
            rows = int(str(value).split("x")[0]) if knob.name == "tile" else 1
            for m in sorted({1, 5, rows, 2 * rows + 1}):
                a = {"x": rng.standard_normal((m, spec.k)), "w": q, "w_scale": scale, "w_zero": zero,
                     "bias": rng.standard_normal(spec.n), "residual": rng.standard_normal((m, spec.out_features)),
                     "norm_scale": rng.standard_normal(spec.k)}
                a = {k: v if k == "w" else v.astype(np.float32) for k, v in a.items() if k in spec.arg_names()}
                assert rel_err(_run(spec, a, m, kernel=kernel), _reference(spec, a)) < 1e-5, (config, m)


def test_default_tile_fits_the_registers():
    """The cost model: 6 rows, and vectors of 16 features while the accumulators take at most
    3/4 of the registers; every tile it picks is one the tuner measures."""
    assert default_tile(32, 16) == "6x4"  # AVX-512
    assert default_tile(16, 8) == "6x1"   # AVX2
    assert default_tile(32, 4) == "6x1"   # NEON
    assert default_tile(16, 4) == "6x1"   # SSE: still spills; the tuner finds better
    tiles = {registers: knobs(LinearSpec(64, 64), registers)[0].values for registers in ((32, 16), (16, 8), (32, 4))}
    for registers, values in tiles.items():
        assert values[0] == default_tile(*registers) and set(values) <= set(TILES)
    assert set(tiles[32, 16]) == set(TILES)  # AVX-512 holds them all
    assert "6x4" not in tiles[16, 8] and "4x2" in tiles[16, 8]  # AVX2: 48 accumulators spill, 16 fit


def test_every_linear_of_a_compiled_llama(rng):
    from llmc.passes.manager import PassContext, run_passes
    from llmc.options import CompileOptions
    from llmc.passes.pipeline import default_pipeline

    graph = llmc.from_onnx(export("llama-tiny", exporter="dynamo", kv_cache=True))
    graph = run_passes(graph, default_pipeline(), PassContext(options=CompileOptions(max_seq_len=128)))
    nodes = [n for n in graph.nodes if n.op == "fused_linear"]
    assert len(nodes) == 9
    for node in nodes:
        spec = LinearSpec.of(node, graph)
        slots = dict(zip(["x", "w", "bias", "residual", "norm_scale", "norm_bias"], node.inputs))
        a = {name: graph.const_value(v) if v.kind == "param" else None for name, v in slots.items() if v is not None}
        a["x"] = rng.standard_normal((1, spec.k)).astype(np.float32)
        if spec.residual:
            a["residual"] = rng.standard_normal((1, spec.out_features)).astype(np.float32)
        assert rel_err(_run(spec, a, 1), _reference(spec, a)) < 1e-5, node.name


# Int8 activations (act_block): integer dot products by each instruction set this CPU runs
# (avx2 here, and plain loops, the fallback, which reads w8 in the unsigned encoding VNNI
# reads), w8 and w4 with and without zero points, decode and prefill row counts, a norm
# prologue and a gated epilogue.
INT8_CASES = [(LinearSpec(130, 96, quant="w8", act_block=32), False, 1),
              (LinearSpec(130, 128, quant="w8", act_block=32, bias=True, norm="rms"), False, 13),
              (LinearSpec(70, 96, quant="w4", group_size=32, act_block=32), True, 1),
              (LinearSpec(200, 256, quant="w4", group_size=128, act_block=32, norm="layer"), False, 7),
              (LinearSpec(96, 64, quant="w4", group_size=64, act_block=32, gated=True, activation="silu"), True, 5)]


def _isas():
    from llmc.backends.tvm import int_dot

    return [isa for isa in (int_dot.choose(tvm.target.Target(host())), "") if isa is not None]


@pytest.mark.parametrize("isa", _isas(), ids=lambda i: i or "loops")
@pytest.mark.parametrize("spec,zero_point,m", INT8_CASES, ids=lambda c: c if not isinstance(c, LinearSpec) else
                         f"{c.n}x{c.k}-{c.quant}-g{c.group_size}{'-' + c.norm if c.norm else ''}{'-gated' * c.gated}")
def test_int8_activation_kernel_matches_reference(spec, zero_point, m, isa, rng):
    spec = replace(spec, isa=isa)
    w = rng.standard_normal((spec.n, spec.k)).astype(np.float32) / 8
    q, scale, zero = quantize(w, spec.quant, spec.group_size, zero_point)
    a = {"x": rng.standard_normal((m, spec.k)), "w": q, "w_scale": scale, "w_zero": zero,
         "bias": rng.standard_normal(spec.n), "norm_scale": rng.standard_normal(spec.k),
         "norm_bias": rng.standard_normal(spec.k)}
    a = {k: v if k == "w" else v.astype(np.float32) for k, v in a.items() if k in spec.arg_names()}
    got, want = _run(spec, a, m), _reference(spec, a)
    f32_activations = _reference(replace(spec, act_block=0), a)
    # the same products as the op's definition. A norm prologue's f32 rounding may move an
    # activation across a quantization step that numpy's does not: one step of one activation
    # moves its row's outputs by about a seventh of the quantization's own error at k 256 (seed
    # 1163210884: 8e-4 against 6.4e-3), so a norm's bound is a quarter of that error; the norm
    # itself is held to 1e-5 with f32 activations (test_kernel_matches_reference)
    quantization = rel_err(want, f32_activations)
    assert rel_err(got, want) < (1e-5 if not spec.norm else quantization / 4)
    assert rel_err(got, want) < quantization / 4 < 0.01


@pytest.mark.parametrize("mcpu,isa", [("sapphirerapids", "avx512vnni"), ("alderlake", "avxvnni"), ("znver3", "avx2")])
def test_each_cpu_gets_its_dot_product_instruction(mcpu, isa):
    """Built (not run: this machine may lack them) for CPUs with VNNI: the instruction is in the code."""
    from llmc.backends.tvm import int_dot

    target = tvm.target.Target({**host(), "mcpu": mcpu})
    assert int_dot.choose(target) == isa
    for quant, group in (("w8", 0), ("w4", 32)):
        spec = LinearSpec(128, 128, quant=quant, group_size=group, act_block=32, isa=isa)
        asm = tvm.compile(schedule(spec).mod, target=target).mod.inspect_source("s")
        want = "vpdpbusd" if "vnni" in isa else "vpmaddubsw"
        assert asm.count(want) >= 8, (mcpu, quant)
        assert ("zmm" in asm) == (isa == "avx512vnni")
