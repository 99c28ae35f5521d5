"""`pip install .` packages every folder under its `llmc` name; the example runs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_the_folders_into_llmc(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("llmc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("llmc/__init__.py", "llmc/cli.py", "llmc/ir/graph.py", "llmc/ops/nn.py",
                   "llmc/frontends/onnx/converters.py", "llmc/passes/__init__.py",
                   "llmc/backends/reference/executor.py", "llmc/runtime/__init__.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "compiler/", "passes/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "llmc = llmc.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "inspect_and_run.py"), "gpt2-tiny"],
                         capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["next token (llmc reference)"].strip() == lines["next token (onnxruntime)"].strip()
