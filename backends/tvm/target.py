"""Build targets, as TVM target dicts (TVM 0.27 rejects target strings)."""

from __future__ import annotations

import os


def host() -> dict:
    """This machine's CPU: LLVM's name for it selects the vector ISA (AVX-512 on Zen 4/5 and
    Sapphire Rapids, AVX2 elsewhere)."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "mtriple": "x86_64-linux-gnu", "num-cores": os.cpu_count() or 1}
