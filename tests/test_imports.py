"""`import llmc` and `import llmc.runtime` stay cheap: no heavy framework is imported."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnx", "onnxruntime", "tvm", "tvm_ffi", "triton", "transformers")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_llmc_is_light():
    assert not _imported_after("import llmc") & set(HEAVY)


def test_import_runtime_is_light():
    assert not _imported_after("import llmc.runtime") & set(HEAVY)


def test_ir_and_reference_need_numpy_only():
    assert not _imported_after("import llmc.ir, llmc.ops, llmc.ir.evaluate") & set(HEAVY)
