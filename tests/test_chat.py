"""Chat, perplexity and `forward` on a tiny model that bundles a tokenizer and a chat template
(a byte-level tokenizer made here: 256 tokens, one per byte, the tiny model's vocabulary).
The real model's answers and perplexity are held to transformers in test_real_model.py."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from zoo_cases import export

import llmc
from llmc.runtime.errors import LlmcError
from llmc.runtime.perplexity import chunks, evaluate

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tokenizer_folder(folder, template: str | None = TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return llmc.compile(export("llama-tiny", exporter="dynamo", kv_cache=True), output=root / "chat.llmc",
                        max_seq_len=128, tokenizer=tokenizer_folder(root / "tok"))


@pytest.fixture
def model(chat_artifact):
    import llmc.runtime

    return llmc.runtime.load(chat_artifact)


def test_chat_goes_on_from_the_cache_as_a_fresh_model_would(chat_artifact, model):
    import llmc.runtime

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    first = model.chat(messages, max_new_tokens=6)
    assert first == model.text.decode(model.generate(model.template.render(messages), 6))
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    again = model.chat(messages, max_new_tokens=6)  # the first turn's tokens come from the cache
    fresh = llmc.runtime.load(chat_artifact).chat(messages, max_new_tokens=6)
    assert again == fresh


def test_chat_sampling_is_seeded(model):
    messages = [{"role": "user", "content": "Hello"}]
    a = model.chat(messages, 8, temperature=1.0, seed=5)
    assert a == model.chat(messages, 8, temperature=1.0, seed=5)


def test_forward_on_a_fresh_model_gives_arrays_the_caller_owns(model):
    a = model.forward(np.array([[1, 2, 3]]), past=0)
    kept = a.copy()
    b = model.forward(np.array([[4]]), past=3)
    c = model.forward(np.array([[7, 8, 9, 10]]), past=0)
    assert np.array_equal(a, kept)  # later calls wrote elsewhere
    assert a.shape == (1, 3, 256) and b.shape == (1, 1, 256) and c.shape == (1, 4, 256)
    # continuing equals the whole sequence at once
    whole = model.forward(np.array([[1, 2, 3, 4]]), past=0)
    np.testing.assert_allclose(b[0, 0], whole[0, 3], rtol=1e-4, atol=1e-5)
    with pytest.raises(LlmcError, match="continues 1 sequences, not 2"):
        model.forward(np.array([[1], [2]]), past=4)


def test_perplexity_of_uniform_logits_is_the_vocabulary():
    ids = [i % 50 for i in range(100)]
    result = evaluate(lambda chunk: np.zeros((len(chunk), 50), np.float32), ids, 16, None)
    assert math.isclose(result.ppl, 50, rel_tol=1e-9) and result.stderr < 1e-5
    assert (result.chunks, result.tokens) == (6, 6 * 7)  # 100 // 16 chunks, the second half less one each


def test_perplexity_chunks_start_with_the_bos_token():
    got = list(chunks(list(range(10, 30)), 8, 2, bos=1))
    assert [c.tolist() for c in got] == [[1, *range(11, 18)], [1, *range(19, 26)]]


def test_the_cli_perplexity_and_chat_on_the_tiny_model(chat_artifact, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    done = run_cli("perplexity", str(chat_artifact), "--text", str(text), "--ctx", "64", "--json")
    assert done.returncode == 0, done.stderr
    assert re.search(r'"chunks": 5, "ctx": 64', done.stdout)
    done = subprocess.run([sys.executable, "-m", "llmc.cli", "chat", str(chat_artifact), "--max-new-tokens", "4",
                           "--system", "S"], input="Hello\n\n/reset\nHi\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 2  # a reply (maybe of several lines) a turn, the empty line skipped


def test_quant_report_measures_a_text(tmp_path):
    import shutil

    from llmc.tools.quant_report import report

    folder = tokenizer_folder(tmp_path / "model")
    shutil.copyfile(export("llama-tiny", exporter="dynamo", kv_cache=True), folder / "model.onnx")
    result = report(str(folder / "model.onnx"), [{"quant": "w8"}], tokens=40,
                    text="A text in English, long enough to hold forty of its bytes as tokens.")
    (row,) = result["schemes"]
    assert result["tokens"] == 40 and row["scheme"] == "w8" and row["perplexity_fp32"] > 1
