"""Decoders nobody here exported: files made by Hugging Face's optimum-onnx and by
onnxruntime-genai's model builder (fp32 and int4; `fixtures/third_party/make.py` made them from
small seeded random models), and a zoo export renamed, reordered and re-dimmed by hand. Each
compiles, and greedy decoding gives onnxruntime's tokens on the same file (from both runtimes:
the Python one and the native one), with the logits of every step within 1e-4 relative."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx import helper
from onnx_reference import OnnxDecoder, at_accuracy_level_0
from zoo_cases import export

import llmc
from llmc import runtime

FIXTURES = Path(__file__).parent / "fixtures" / "third_party"
FILES = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.onnx").exists())
STEPS = 16
PROMPT = [5, 17, 33, 2, 99, 7, 250]


def _check(path, art, native, steps=STEPS, tol=1e-4):
    """onnxruntime's greedy tokens from both runtimes (the native one: `native`, llmc-run), and
    its logits at each step."""
    want_tokens, want_logits = OnnxDecoder(path, art).greedy(PROMPT, steps)
    model = runtime.load(art)
    assert model.generate(PROMPT, steps) == want_tokens
    done = subprocess.run([str(native), str(art), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                           str(steps)], capture_output=True, text=True)
    assert done.returncode == 0 and [int(t) for t in done.stdout.split()] == want_tokens, done.stderr
    model.executor.reset(batch=1)
    logits = model.forward(np.array([PROMPT]), past=0)[0, -1]
    for step, token in enumerate(want_tokens):
        assert rel_err(logits, want_logits[step]) < tol, step
        logits = model.forward(np.array([[token]]), past=len(PROMPT) + step)[0, -1]


def test_fixtures_are_there():
    assert {"optimum-llama", "optimum-qwen2", "optimum-mistral", "optimum-phi3", "optimum-gpt2", "genai-llama-fp32",
            "genai-qwen2-fp32", "genai-mistral-fp32", "genai-llama-int4"} <= set(FILES)


def _cases(names):
    """Mistral's files repeat Llama's model through each exporter's Mistral path: slow tests."""
    return [pytest.param(n, marks=pytest.mark.slow if "mistral" in n else ()) for n in names]


@pytest.mark.parametrize("name", _cases(n for n in FILES if not n.endswith("int4")))
def test_third_party_export_gives_onnxruntime_tokens(name, tmp_path, native):
    path = FIXTURES / name / "model.onnx"
    _check(path, llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64), native)


@pytest.mark.parametrize("name", _cases(n for n in FILES if n.endswith("int4")))
def test_int4_genai_export_keeps_its_weights(name, tmp_path, native):
    """MatMulNBits weights are taken as they are. onnxruntime's CPU kernel at the builder's
    accuracy level 4 rounds the activations to int8 too; at level 0 it computes in f32 with the
    same 4-bit weights, which is what llmc computes with f32 activations: that run is the
    reference. (With int8 activations, llmc's default, the rounding differs from onnxruntime's.)"""
    path = at_accuracy_level_0(FIXTURES / name / "model.onnx", tmp_path)
    art = llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64, activations="f32")
    quant = runtime.load(art).manifest["model"]["quant"]
    assert quant["scheme"] == "w4" and quant["imported"] and quant["lm_head"] == "w4"
    _check(path, art, native)


def test_group_query_attention_with_a_sliding_window(tmp_path, native):
    """GroupQueryAttention's local_window_size, shorter than the tokens decoded: a mask."""
    model = onnx.load(str(FIXTURES / "genai-llama-fp32" / "model.onnx"))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "GroupQueryAttention" and a.name == "local_window_size":
                a.i = 5
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    _check(path, llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64), native)


def _rename(src: Path, dst: Path) -> None:
    """A zoo export as another tool might write it: other input, output and dim names, every
    key before every value, outputs in another order, and no position_ids (the graph derives
    them from the cache length)."""
    model = onnx.load(str(src))
    g = model.graph
    names = {"input_ids": "tokens", "attention_mask": "am"}
    for i in range(8):
        for kind in ("key", "value"):
            names[f"past_key_values.{i}.{kind}"] = f"cache_{kind[0]}_{i}"
            names[f"present.{i}.{kind}"] = f"new_{kind[0]}_{i}"
    dims = {"batch": "B", "seq": "S", "past": "P", "total": "P + S", "past + seq": "P + S"}
    # position_ids = range(P, P + S) broadcast to [B, S], from the shapes of tokens and a cache
    first_key = next(v.name for v in g.input if v.name.endswith(".key"))
    c = [helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v]) for n, v in (("c1", 1), ("c2", 2), ("one", 1))]
    g.initializer.extend(c)
    derive = [
        helper.make_node("Shape", ["tokens"], ["shape_t"]), helper.make_node("Gather", ["shape_t", "c1"], ["s"]),
        helper.make_node("Shape", [names[first_key]], ["shape_c"]), helper.make_node("Gather", ["shape_c", "c2"], ["p"]),
        helper.make_node("Add", ["p", "s"], ["end"]),
        helper.make_node("Squeeze", ["p"], ["p0"]), helper.make_node("Squeeze", ["end"], ["end0"]),
        helper.make_node("Squeeze", ["one"], ["one0"]),
        helper.make_node("Range", ["p0", "end0", "one0"], ["row"]),
        helper.make_node("Unsqueeze", ["row", "c0"], ["position_ids"]),
    ]
    g.initializer.append(helper.make_tensor("c0", onnx.TensorProto.INT64, [1], [0]))
    for node in g.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    inputs = [v for v in g.input if v.name != "position_ids"]
    inputs.sort(key=lambda v: (v.name.endswith(".value"), v.name))  # keys first
    outputs = list(g.output)[1:] + [g.output[0]]  # the logits last
    for v in inputs + outputs:
        v.name = names.get(v.name, v.name)
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = dims.get(d.dim_param, d.dim_param)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    nodes = derive + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_renamed_reordered_redimmed_export_gives_the_same_tokens(name, artifacts, tmp_path, native):
    path = tmp_path / "renamed.onnx"
    _rename(export(name, exporter="torchscript", kv_cache=True), path)
    art = llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64)
    roles = runtime.load(art).manifest["model"]["roles"]
    assert roles == {"tokens": "tokens", "mask": "am", "positions": None, "logits": "logits"}
    _check(path, art, native)
    assert runtime.load(art).generate(PROMPT, STEPS) == runtime.load(artifacts(name)).generate(PROMPT, STEPS)


def test_last_position_logits_export(tmp_path, native):
    """An export that returns only the last position's logits (`logits[:, -1:]`, as
    transformers' logits_to_keep=1 writes it): its shape is [batch, min(seq, 1), vocab], a dim
    the runtime evaluates."""
    src = export("llama-tiny", exporter="torchscript", kv_cache=True)
    model = onnx.load(str(src))
    g = model.graph
    g.initializer.extend([helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v])
                          for n, v in (("m1", -1), ("big", 2**62), ("ax1", 1))])
    old = g.output[0].name
    for node in g.node:
        node.output[:] = ["full_logits" if o == old else o for o in node.output]
    g.node.append(helper.make_node("Slice", ["full_logits", "m1", "big", "ax1"], [old]))
    g.output[0].type.tensor_type.shape.dim[1].dim_param = "one"
    path = tmp_path / "last.onnx"
    onnx.save(model, str(path))
    art = llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64)
    assert "min(seq, 1)" in (art / "manifest.json").read_text()
    _check(path, art, native)


def test_text_in_text_out_with_the_bundled_tokenizer(tmp_path):
    """The tokenizer and configs beside the file are bundled (and checksummed like every file);
    the artifact takes text, streams text, and stops at the configs' end-of-sequence token."""
    import json
    import sys

    from tokenizers import Tokenizer

    folder = FIXTURES / "optimum-llama"
    art = llmc.compile(folder / "model.onnx", output=tmp_path / "m.llmc", max_seq_len=64)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["tokenizer"] == "model/tokenizer.json"
    assert manifest["model"]["eos_token_ids"] == [2]  # generation_config.json's
    assert {"model/tokenizer.json", "model/config.json", "model/generation_config.json"} <= set(manifest["files"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "the quick brown fox"
    model = runtime.load(art)
    ids = model.generate(prompt, 12)
    assert ids == model.generate(tokenizer.encode(prompt).ids, 12)
    streamed = []
    model.generate(prompt, 12, on_token=model.text.stream(streamed.append))
    assert "".join(streamed) == tokenizer.decode(ids)
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(art), "--prompt", prompt, "--max-new-tokens", "12"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == tokenizer.decode(ids).strip(), out.stderr
    # stopping: the first token generated, named the end of sequence, ends generation after it
    stop = llmc.compile(folder / "model.onnx", output=tmp_path / "s.llmc", max_seq_len=64, eos_token_id=ids[0])
    assert runtime.load(stop).generate(prompt, 12) == ids[:1]


def test_a_broken_tokenizer_is_refused_at_compile_time_and_text_needs_one(tmp_path, artifacts):
    import shutil

    from llmc.errors import LlmcError

    shutil.copy(FIXTURES / "optimum-gpt2" / "model.onnx", tmp_path / "model.onnx")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmcError, match="tokenizer.json: not a tokenizer"):
        llmc.compile(tmp_path / "model.onnx", output=tmp_path / "m.llmc", max_seq_len=64)
    with pytest.raises(LlmcError, match="bundles no tokenizer"):
        runtime.load(artifacts("llama-tiny")).generate("hello", 2)


def test_an_input_without_a_role_is_named(tmp_path):
    """A float input that is no past of a cache (here a scale on the logits) has no role the
    runtime could feed: refused before any kernel is built, naming the file and the input."""
    model = onnx.load(str(FIXTURES / "optimum-llama" / "model.onnx"))
    g = model.graph
    old = g.output[0].name
    for node in g.node:
        node.output[:] = ["raw_logits" if o == old else o for o in node.output]
    g.node.append(helper.make_node("Mul", ["raw_logits", "scale"], [old]))
    g.input.append(helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1]))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    from llmc.errors import LlmcError

    with pytest.raises(LlmcError, match=r"model.onnx: input 'scale' has no role"):
        llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64)
