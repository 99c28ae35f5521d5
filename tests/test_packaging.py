"""What `pip install` gives a user: a real wheel, built from the tracked files alone, installed
into fresh virtual environments; the example runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of the tracked files (a copy of the tree: no stale build/ folder can leak in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tmp / "src" / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp), str(tmp / "src")], check=True, capture_output=True)
    (path,) = tmp.glob("llmc-*.whl")
    return path


def test_wheel_holds_every_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    for folder, package in (("compiler", "llmc"), ("passes", "llmc/passes"), ("backends", "llmc/backends"),
                            ("runtime", "llmc/runtime")):
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"{package}/{init.parent.relative_to(ROOT / folder).as_posix()}".rstrip("/.") in packages, init
    assert {"llmc/frontends/fx", "llmc/torch_compile", "llmc/tools", "llmc/zoo"} <= packages
    assert not any(n.startswith(("tests/", "compiler/", "passes/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "llmc = llmc.cli:main" in meta and "llmc = llmc.torch_compile.backend:llmc_backend" in meta
    requires = _requires(wheel)
    assert any(r.startswith("apache-tvm==") for r in requires[None]), "pip install llmc must compile"
    assert not any("tvm" in r for r in requires["runtime"]), "running an artifact needs no TVM"
    assert any(n.startswith("llmc/runtime/libllmc") and n.endswith(".so") for n in names), "libllmc is built"


def _requires(wheel) -> dict:
    """Requires-Dist of the wheel, by extra (None: the base install)."""
    z = zipfile.ZipFile(wheel)
    text = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    out: dict = {}
    for line in text.splitlines():
        if line.startswith("Requires-Dist: "):
            req, _, marker = line[len("Requires-Dist: "):].partition(";")
            extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else None
            out.setdefault(extra, []).append(req.strip())
    return out


def _venv(path: Path, borrow: bool) -> Path:
    """A fresh virtual environment; with `borrow`, it sees this environment's installed packages
    (torch, onnx, TVM) after its own, instead of downloading them again."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    python = path / "bin" / "python"
    if borrow:
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _run(python, *args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow  # 25 s: a wheel installed into a fresh environment (CI runs it)
def test_installed_wheel_compiles_runs_and_serves_torch_compile(wheel, tmp_path):
    from zoo_cases import export

    python = _venv(tmp_path / "venv", borrow=True)
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel))
    bin_ = python.parent
    assert "compile" in _run(bin_ / "llmc", "--help")
    where = _run(python, "-c", "import llmc; print(llmc.__file__)", cwd=tmp_path)
    assert where.startswith(str(tmp_path / "venv")), where
    art = tmp_path / "m.llmc"
    _run(bin_ / "llmc", "compile", str(export("gpt2-tiny", exporter="dynamo", kv_cache=True)), "-o", str(art),
         "--max-seq-len", "32")
    tokens = _run(bin_ / "llmc", "run", str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4").split()
    assert len(tokens) == 4
    # the native runtime's sources ship in the wheel: it builds and gives the same tokens
    program = _run(bin_ / "llmc", "runtime", "build", "-o", str(tmp_path / "llmc-run")).strip()
    out = subprocess.run([program, str(art), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"], capture_output=True,
                         text=True)
    assert out.stdout.split() == tokens, out.stderr
    assert "aten.mm" in _run(bin_ / "llmc", "ops", "--aten").split()
    code = """
import torch, llmc
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
x = torch.randn(3, 8)
with torch.no_grad():
    got, want = torch.compile(m, backend="llmc")(x), m(x)
from llmc.torch_compile.backend import REPORTS
assert REPORTS and REPORTS[-1].compiled_nodes > 0, REPORTS
print(float((got - want).abs().max()))
"""
    assert float(_run(python, "-c", code, cwd=tmp_path)) < 1e-5


@pytest.mark.slow
def test_runtime_extra_alone_runs_an_artifact(wheel, artifacts, tmp_path):
    """`pip install --no-deps llmc` plus the `runtime` extra's packages, nothing else: an
    artifact runs, and neither torch, onnx nor TVM is there to import."""
    python = _venv(tmp_path / "venv", borrow=False)
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *_requires(wheel)["runtime"])
    _run(python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel))
    out = _run(python, "-c", f"""
import importlib.util, llmc.runtime
assert not any(importlib.util.find_spec(m) for m in ("torch", "onnx", "onnxruntime", "networkx", "tvm", "tvm_ffi")), \
    "not alone"
print(llmc.runtime.load({str(artifacts("llama-tiny"))!r}).generate([1, 2, 3], 5))
""", cwd=tmp_path)
    assert len(eval(out)) == 5


def test_example_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "inspect_and_run.py"), "gpt2-tiny"],
                         capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["next token (llmc reference)"].strip() == lines["next token (onnxruntime)"].strip()
