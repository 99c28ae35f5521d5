"""The command line: version, inspect (summary, --ir, --svg), ops, zoo."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from zoo_cases import export

from llmc import __version__
from llmc.cli import main, onnx_ops_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_version():
    out = subprocess.run([sys.executable, "-m", "llmc.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"llmc {__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().out


def test_inspect_summary(capsys):
    path = export("llama-tiny", exporter="dynamo", kv_cache=True)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input_ids                i64[batch, seq]" in out
    assert "past_key_values.0.key    f32[batch, 2, past, 16]" in out
    assert "present.1.value          f32[batch, 2, past + seq, 16]" in out
    assert "symbolic dims: batch, past, seq, total" in out
    assert "parameters: 106,859 in" in out  # the weights, and the constants of the graph
    assert "matmul             19" in out


def test_inspect_ir_and_svg(capsys, tmp_path):
    path = export("gpt2-tiny", exporter="torchscript", kv_cache=False)
    svg = tmp_path / "g.svg"
    assert main(["inspect", str(path), "--ir", "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "graph main_graph(%input_ids: i64[batch, seq]" in out
    assert " = matmul(" in out and "return %logits" in out
    root = ET.parse(svg).getroot()
    assert len(list(root.iter("{http://www.w3.org/2000/svg}rect"))) > 50


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_svg_of_one_layer(exporter):
    from llmc import from_onnx
    from llmc.ir.draw import layer_nodes, to_svg

    graph = from_onnx(export("llama-tiny", exporter=exporter, kv_cache=True))
    layer0, layer1 = layer_nodes(graph, 0), layer_nodes(graph, 1)
    assert 50 < len(layer0) < len(graph.nodes) / 2 and 50 < len(layer1) < len(graph.nodes) / 2
    assert not set(layer0) & set(layer1)
    assert {n.op for n in layer0} >= {"matmul", "softmax", "sigmoid"}
    assert all(n.scope.startswith("model.model.layers.1") for n in layer1 if n.op == "matmul")
    svg = to_svg(graph, layer=1)
    assert "layer 1" in svg and svg.count("<rect") == len(layer1)


def test_inspect_passes_dump_and_side_by_side(capsys, tmp_path):
    path = export("llama-tiny", exporter="torchscript", kv_cache=True)
    svg, dump = tmp_path / "layer.svg", tmp_path / "ir"
    assert main(["inspect", str(path), "--passes", "--dump-ir", str(dump), "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "recognize_attention: " in out and "attention 0->2" in out
    assert "kernels per layer (layer 1): 6: fused_linear, rope_cache, attention" in out
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps[0] == "00-input.txt" and "09-recognize_norms.txt" in dumps
    assert "rms_norm(" in (dump / "09-recognize_norms.txt").read_text()
    text = svg.read_text()
    assert "layer 1 before the passes" in text and "layer 1 after the passes (7 nodes)" in text


def test_ops_markdown_is_current():
    """docs/onnx-ops.md is generated from the converter table; regenerate with
    `llmc ops --markdown > docs/onnx-ops.md`."""
    assert (ROOT / "docs" / "onnx-ops.md").read_text() == onnx_ops_markdown()


def test_ops_aten_lists_the_fx_converters(capsys):
    assert main(["ops", "--aten"]) == 0
    ops = capsys.readouterr().out.split()
    assert {"aten.mm", "aten._scaled_dot_product_flash_attention_for_cpu", "aten.native_layer_norm"} <= set(ops)
    assert "aten.cumprod" not in ops


def test_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "llama-0.5b" in out and "gpt2-124m" in out and "bert-tiny" in out


def test_zoo_export_copy(capsys, tmp_path):
    out_path = tmp_path / "m.onnx"
    assert main(["zoo", "export", "opt-tiny", "--exporter", "torchscript", "-o", str(out_path)]) == 0
    assert capsys.readouterr().out.strip() == str(out_path)
    assert out_path.stat().st_size > 100_000


def test_zoo_unknown_model(capsys):
    assert main(["zoo", "export", "gpt5"]) == 2
    assert "unknown zoo model 'gpt5'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["inspect"], ["zoo", "export"], ["runtime", "build"], ["package", "m.onnx"]])
def test_usage_errors_exit_2(args):
    out = subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr


def test_unknown_runtime_target_and_cpu(capsys, tmp_path):
    assert main(["runtime", "build", "--target", "riscv64", "-o", str(tmp_path / "x")]) == 2
    assert "architecture 'riscv64' is not supported; supported: x86_64, arm64" in capsys.readouterr().err
    model = str(export("llama-tiny", exporter="dynamo", kv_cache=True))
    assert main(["compile", model, "--target", "arm64", "--cpu", "cortex-a99", "-o", str(tmp_path / "m")]) == 2
    assert "CPU 'cortex-a99' is not supported for this target; supported: generic, cortex-a55" in capsys.readouterr().err


@pytest.mark.slow  # a compile on a pseudo-terminal (13 s)
def test_compile_shows_progress_on_a_terminal_only(tmp_path):
    import os
    import pty

    source = str(export("gpt2-tiny", exporter="dynamo", kv_cache=True))
    cmd = [sys.executable, "-m", "llmc.cli", "compile", source, "--max-seq-len", "32"]
    quiet = subprocess.run(cmd + ["-o", str(tmp_path / "a.llmc")], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""
    main_fd, term = pty.openpty()
    done = subprocess.run(cmd + ["-o", str(tmp_path / "b.llmc")], stdout=subprocess.PIPE, stderr=term)
    os.close(term)
    shown = b""
    while True:
        try:
            chunk = os.read(main_fd, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(main_fd)
    assert done.returncode == 0
    text = shown.decode(errors="replace")
    assert "compiling model.onnx: kernels (TVM)" in text and "pass recognize_attention" in text, text[-500:]
