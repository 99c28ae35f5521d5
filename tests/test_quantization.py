"""Weight-only quantization: the schemes' rounding, the pass, and compiled quantized decoders
against the reference semantics of their quantized graphs (and near their fp32 originals)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from conftest import rel_err
from zoo_cases import export

import llmc
from llmc import runtime, zoo
from llmc.ops.transformer import dequantize
from llmc.passes.manager import PassContext, run_passes
from llmc.options import CompileOptions
from llmc.passes.pipeline import default_pipeline
from llmc.passes.quantize_weights import quantize

SCHEMES = [("w8", 0, False), ("w4", 32, False), ("w4", 64, True), ("w4", 128, False)]


@pytest.mark.parametrize("quant,group,zero_point", SCHEMES)
def test_quantize_rounds_to_the_nearest_step(quant, group, zero_point, rng):
    w = (rng.standard_normal((40, 256)) * rng.uniform(0.01, 1, (40, 1))).astype(np.float32)
    if zero_point:
        w += 0.5  # groups not centred on zero: what the zero point is for
    q, scale, zero = quantize(w, quant, group, zero_point)
    assert q.dtype == (np.int8 if quant == "w8" else np.uint8)
    assert q.max() <= (127 if quant == "w8" else 15) and q.min() >= (-127 if quant == "w8" else 0)
    step = np.abs(scale[:, None] if quant == "w8" else np.repeat(scale, group, axis=1))
    error = np.abs(dequantize(q, scale, zero, quant, group) - w)
    if quant == "w4" and not zero_point:
        # Q4_0's grid: each group's extreme is exactly level -8 (the scale carries its sign);
        # the other side's values up to it reach level 7 only: clipped there by up to a step
        groups = w.reshape(len(w), -1, group)
        extreme = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[..., None], axis=2)
        assert np.allclose(scale, extreme[..., 0] / -8)
        clipped = (q == 15).reshape(error.shape)
        assert np.all(error[clipped] <= step[clipped] * (1 + 1e-5))
        error, step = error[~clipped], step[~clipped]
    assert np.all(error <= step / 2 * (1 + 1e-5))


def _passed(name, **options):
    graph = llmc.from_onnx(export(name, exporter="dynamo", kv_cache=True))
    return run_passes(graph, default_pipeline(), PassContext(options=CompileOptions.of(max_seq_len=128, **options)))


@pytest.mark.parametrize("quant", ["w8", "w4"])
def test_pass_quantizes_every_gemm_and_the_lm_head_by_option(quant):
    graph = _passed("llama-tiny", quant=quant, group_size=32)
    gemms = [n for n in graph.nodes if n.op == "fused_linear"]
    head = [n for n in gemms if n.outputs[0] in graph.outputs]
    assert len(head) == 1 and head[0].attrs["quant"] == "w8"  # the default LM head encoding
    assert all(n.attrs["quant"] == quant for n in gemms if n is not head[0])
    assert graph.metadata["quant"] == {"scheme": quant, "group_size": 32 if quant == "w4" else 0,
                                       "zero_point": False, "lm_head": "w8", "embedding": "w8",
                                       "activations": "f32"}
    f32_head = _passed("llama-tiny", quant=quant, group_size=32, lm_head="f32")
    assert [n.attrs["quant"] for n in f32_head.nodes if n.op == "fused_linear" and n.outputs[0] in f32_head.outputs] \
        == [""]
    with_head = _passed("llama-tiny", quant=quant, group_size=32, lm_head=quant)
    assert all(n.attrs["quant"] == quant for n in with_head.nodes if n.op == "fused_linear")
    # one byte per value here (4-bit values pack two per byte in the artifact), f32 scales and zeros
    assert _gemm_bytes(with_head) < _gemm_bytes(_passed("llama-tiny")) / (3.5 if quant == "w8" else 3)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_embedding_w8_quantizes_the_token_table_only(name, rng):
    graph = _passed(name, quant="w8", embedding="w8")
    vocab = graph.outputs[0].shape[-1]
    tables = [graph.const_value(n.inputs[0]) for n in graph.nodes if n.op == "gather"
              and graph.const_value(n.inputs[0]) is not None and graph.const_value(n.inputs[0]).ndim == 2]
    # the token table as int8 rows; GPT-2's position table (128 rows) stays f32
    assert [(t.shape[0], t.dtype) for t in tables if t.shape[0] == vocab] == [(vocab, np.int8)]
    assert all(t.dtype == np.float32 for t in tables if t.shape[0] != vocab)
    assert graph.metadata["quant"]["embedding"] == "w8"
    feeds = zoo.get(name).feeds(rng, batch=2, seq=5, past=3)
    plain = llmc.run_reference(_passed(name, quant="w8", embedding="f32"), feeds)["logits"]
    assert 0 < rel_err(llmc.run_reference(graph, feeds)["logits"], plain) < 0.02


def _gemm_bytes(graph):
    return sum(graph.const_value(v).nbytes for n in graph.nodes if n.op == "fused_linear"
               for v in n.inputs[1:2] + n.inputs[6:] if v is not None)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")

    def get(name, **options):
        out = root / f"{name}-{'-'.join(f'{k}{v}' for k, v in options.items())}.llmc"
        if not out.exists():
            llmc.compile(export(name, exporter="dynamo", kv_cache=True), output=out, max_seq_len=128, **options)
        return out
    return get


# int8 activations (the cpu default) for most; f32 activations (weights dequantized) twice.
# Half run with the slow tests (the default run stays near 10 minutes).
INT8 = {"activations": "int8"}
CASES = [("llama-tiny", {"quant": "w8", **INT8}),
         pytest.param("llama-tiny", {"quant": "w8", "activations": "f32"}, marks=pytest.mark.slow),
         ("llama-tiny", {"quant": "w4", "group_size": 32, **INT8}),
         ("gpt2-tiny", {"quant": "w4", "group_size": 64, "zero_point": True, **INT8}),
         ("qwen2-tiny", {"quant": "w4", "group_size": 32, "lm_head": "w4", "activations": "f32"}),
         pytest.param("qwen2-tiny", {"quant": "w4", "group_size": 128, "lm_head": "w4", **INT8},
                      marks=pytest.mark.slow),
         pytest.param("gpt2-tiny", {"quant": "w8", "lm_head": "f32", "embedding": "f32", **INT8},
                      marks=pytest.mark.slow),
         pytest.param("llama-tiny", {"quant": "w4", "group_size": 32, "awq": True, **INT8}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,options", CASES, ids=lambda c: c if isinstance(c, str) else
                         "-".join(f"{k}={v}" for k, v in c.items()))
def test_compiled_quantized_decoder_matches_its_reference(name, options, quantized, rng):
    graph = _passed(name, **options)
    art = quantized(name, **options)
    assert json.loads((art / "manifest.json").read_text())["model"]["quant"] == graph.metadata["quant"]
    model = runtime.load(art)
    model.executor.reset(batch=1)
    feeds = zoo.get(name).feeds(rng, batch=1, seq=7, past=0)
    want = llmc.run_reference(graph, feeds)["logits"]
    # int8 activations: where the kernel's float order and numpy's put an activation on either
    # side of a rounding tie, it takes the other int8 step, and the logits move by about 1e-3
    tolerance = 5e-3 if options.get("activations") == "int8" else 1e-4
    assert rel_err(model.forward(feeds["input_ids"], past=0), want) < tolerance
    # a decode step over the quantized cache, too
    step = zoo.get(name).feeds(rng, batch=1, seq=1, past=7)
    step.update({k: v for k, v in llmc.run_reference(graph, feeds).items() if k.startswith("present")})
    step = {k.replace("present", "past_key_values"): v for k, v in step.items()}
    want = llmc.run_reference(graph, step)["logits"]
    assert rel_err(model.forward(step["input_ids"], past=7), want) < tolerance
    # and near the fp32 model
    fp32 = llmc.run_reference(_passed(name), feeds)["logits"]
    assert rel_err(llmc.run_reference(graph, feeds)["logits"], fp32) < (0.02 if options["quant"] == "w8" else 0.3)


@pytest.mark.slow  # a whole quant-report run (32 s)
def test_quant_report_measures_every_scheme(tmp_path):
    from llmc.cli import main

    out = tmp_path / "report.json"
    assert main(["quant-report", "llama-tiny", "--quant", "w8", "w4", "--group-size", "32", "--zero-point",
                 "--kv-int8", "--tokens", "48", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    names = ["w8", "w4 g32", "w4 g32 zero-point"]
    assert [r["scheme"] for r in result["schemes"]] == names + [f"{n}, int8 KV" for n in names]
    w8, *w4 = result["schemes"][:3]
    for r in result["schemes"]:
        assert 0 < r["mean_rel_err"] <= r["max_rel_err"] and 0 < r["top1_agreement"] <= 1
        assert r["perplexity_fp32"] > 1 and r["perplexity"] > 1
        # the decode kernels, token by token, measured on their own
        assert 0 < r["decode"]["mean_rel_err"] <= r["decode"]["max_rel_err"] and 0 < r["decode"]["top1_agreement"] <= 1
    # 8 bits lose less than 4
    assert w8["mean_rel_err"] < min(r["mean_rel_err"] for r in w4) / 3
    assert w8["top1_agreement"] >= max(r["top1_agreement"] for r in w4)


@pytest.mark.slow  # two quantizers and a report (25 s)
def test_quant_report_measures_onnxruntimes_quantization_too(tmp_path):
    from llmc.cli import main

    out = tmp_path / "report.json"
    assert main(["quant-report", "llama-tiny", "--quant", "w8", "--tokens", "32", "--onnxruntime",
                 "--json", str(out)]) == 0
    ours, theirs = json.loads(out.read_text())["schemes"]
    # the label says what onnxruntime's quantizer changed and what it left
    assert theirs["scheme"].startswith("onnxruntime int8 (dynamic, per channel): ")
    assert "MatMulInteger" in theirs["scheme"] or "DynamicQuantizeMatMul" in theirs["scheme"]
    assert "float GEMMs left" in theirs["scheme"]
    assert 0 < theirs["mean_rel_err"] < 0.1 and 0 < theirs["top1_agreement"] <= 1
    assert 0 < ours["mean_rel_err"] < 0.1


@pytest.mark.slow
def test_bench_runs_quantized_modes_against_onnxruntimes(tmp_path):
    from llmc.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "llama-tiny", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                 "--quant", "w8", "w4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    systems = result["systems"]
    fp32 = systems["llmc"]["decode_weight_mb"]
    assert {"llmc w8", "onnxruntime w8", "llmc w4", "onnxruntime w4", "llama.cpp q8_0", "llama.cpp q4_0"} \
        <= set(systems)
    # llama.cpp's 8-bit model of the same weights gives the fp32 reference's greedy tokens
    assert systems["llama.cpp q8_0"]["tokens_as_onnxruntime"] == "4/4"
    assert systems["llama.cpp q4_0"]["decode_weight_mb"] < systems["llama.cpp q8_0"]["decode_weight_mb"] < fp32 / 3
    quantized = result["onnxruntime_quantization"]
    assert quantized["onnxruntime w4"]["quantized"]["MatMulNBits"]["count"] > 0
    assert quantized["onnxruntime w8"]["quantized"], "dynamic int8 ops"
    assert systems["llmc w8"]["decode_weight_mb"] < fp32 / 3.5
    assert systems["llmc w4"]["decode_weight_mb"] < systems["llmc w8"]["decode_weight_mb"]
    assert all(s["decode_tok_s"] > 0 for s in systems.values())


def test_activation_aware_scales_protect_large_activations(rng):
    from llmc.passes.awq import search_scales

    h = rng.standard_normal((64, 256)).astype(np.float32)
    h[:, rng.choice(256, 4, replace=False)] *= 30  # a few salient input features, as trained models have
    w = rng.standard_normal((96, 256)).astype(np.float32)
    scales, plain, scaled = search_scales(h, w, 128, zero_point=False)
    assert scales is not None and scaled < 0.8 * plain


def test_clipping_search_lowers_the_output_error(rng):
    from llmc.passes.awq import search_clip

    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 6  # a few outlier weights that stretch their groups' steps

    def error(weights):
        q, scale, zero = quantize(weights, "w4", 128, False)
        return np.linalg.norm(x @ (dequantize(q, scale, zero, "w4", 128) - w).T)

    clipped = search_clip(x, w, 128, zero_point=False)
    assert np.all(np.abs(clipped) <= np.abs(w)) and np.any(clipped != w)
    assert error(clipped) < 0.9 * error(w)


def test_awq_folds_its_scales_without_changing_the_fp32_model(rng, monkeypatch):
    from llmc.passes import awq as awq_module
    from llmc.passes.pipeline import CLEANUP, FUSION, KV_CACHE, RECOGNITION

    monkeypatch.setattr(awq_module, "CLIP_RATIOS", np.array([1.0]))  # scales only: exact in fp32
    before = CLEANUP + RECOGNITION + KV_CACHE + FUSION
    path = export("llama-tiny", exporter="dynamo", kv_cache=True)
    options = CompileOptions.of(max_seq_len=128, quant="w4", group_size=32, awq=True)
    ctx = PassContext(options=options)
    scaled = run_passes(llmc.from_onnx(path), before + [awq_module.awq], ctx)
    # every GEMM is clipped; scaled where a scaling beats plain rounding on the calibration tokens
    # and can fold: QKV and gate/up (norm prologues), down (into the gated GEMM's up rows)
    report = ctx.reports[-1]
    assert sum(report.rewrites.values()) == 8 and 1 <= report.rewrites["scaled and clipped"] <= 6
    assert len(report.near_misses) == 2  # the attention output projections
    plain = run_passes(llmc.from_onnx(path), before, PassContext(options=options))
    feeds = zoo.get("llama-tiny").feeds(rng, batch=1, seq=5, past=3)
    assert rel_err(llmc.run_reference(scaled, feeds)["logits"], llmc.run_reference(plain, feeds)["logits"]) < 1e-5
    weights = [n.inputs[1].name for n in scaled.nodes if n.op == "fused_linear"]
    assert any(w.endswith(".awq_up") for w in weights)  # a down projection's scales, in the up rows


@pytest.mark.slow  # three artifacts per family (15-20 s each)
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "qwen2-tiny"])
def test_int8_kv_cache_stays_close_to_the_f32_cache(name, quantized, rng):
    f32 = runtime.load(quantized(name))
    art = quantized(name, kv_cache="int8")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["kv_cache"]["dtype"] == "int8"
    assert {v["dtype"] for n, v in manifest["plans"]["values"].items() if n.startswith("past_key_values")} \
        == {"int8", "float32"}  # the caches and their scales
    int8 = runtime.load(art)
    prompt = rng.integers(0, zoo.get(name).config().vocab_size, (1, 9))
    for model in (f32, int8):
        model.executor.reset(batch=1)
    a, b = f32.forward(prompt, 0), int8.forward(prompt, 0)
    assert rel_err(b, a) < 0.05
    for step in range(8):  # decode steps read the quantized rows the earlier steps wrote
        token = np.array([[int(a[0, -1].argmax())]])
        a, b = f32.forward(token, 9 + step), int8.forward(token, 9 + step)
        assert 1e-7 < rel_err(b, a) < 0.05, step


@pytest.mark.parametrize("args,message", [
    (["--awq"], "--awq, --calibration-ids and --calibration-text apply to --quant w4"),
    (["--quant", "w8", "--awq"], "--awq, --calibration-ids and --calibration-text apply to --quant w4"),
    (["--zero-point"], "apply with --quant"),
    (["--embedding", "w8"], "apply with --quant"),
    (["--kv-cache", "int4"], "invalid choice"),
])
def test_compile_refuses_options_that_do_not_apply(args, message, tmp_path, capsys):
    from llmc.cli import main

    model = export("llama-tiny", exporter="dynamo", kv_cache=True)
    with pytest.raises(SystemExit) if "invalid" in message else contextlib.nullcontext():  # argparse exits
        assert main(["compile", str(model), "-o", str(tmp_path / "x.llmc"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.llmc").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-trained", "gpt2-trained"])
def test_quantization_quality_on_trained_models(name):
    """The issue's quality targets, on byte-level models of the two architectures trained on
    real text (random-weight models predict near-ties, see docs/benchmarks.md): over 256 held-out
    positions, w8 agrees with fp32 on >= 99% of next tokens, w4 with activation-aware scaling on
    >= 90%, and the scaling errs less than plain rounding."""
    from llmc.tools.quant_report import report

    result = report(name, [{"quant": "w8"}, {"quant": "w4", "group_size": 128},
                           {"quant": "w4", "group_size": 128, "awq": True}], tokens=256)
    w8, rtn, awq = result["schemes"]
    assert w8["perplexity_fp32"] < 50  # it learned the text: a uniform guess scores 256
    assert w8["top1_agreement"] >= 0.99
    assert awq["top1_agreement"] >= 0.90
    assert awq["mean_rel_err"] < rtn["mean_rel_err"]


def test_inspect_names_the_encoding(quantized, capsys):
    from llmc.cli import main

    art = quantized("llama-tiny", quant="w4", group_size=32, activations="int8")
    assert main(["inspect", str(art)]) == 0
    assert "weights w4 g32 (LM head w8, embedding w8, int8 activations)" in capsys.readouterr().out
