"""Build targets, as TVM target dicts (TVM 0.27 rejects target strings)."""

from __future__ import annotations

import os


def host(cpu: str = "native") -> dict:
    """A CPU of this machine's architecture: "native" is this machine's CPU, whose LLVM name
    selects the vector ISA (AVX-512 on Zen 4/5 and Sapphire Rapids, AVX2 elsewhere); a portable
    level ("x86-64-v3": AVX2 and FMA; "x86-64-v4": AVX-512) is an LLVM CPU name too, and runs on
    every CPU of that level (`llmc.runtime.cpu`).

    Floating-point reassociation and contraction let LLVM vectorize reductions (attention's dot
    products over the head dim: attention ran 3-5x faster) and fuse multiply-adds. The other
    fast-math flags stay off: masks and empty softmax rows rely on -inf and NaN semantics."""
    import tvm

    mcpu = tvm.target.codegen.llvm_get_system_cpu() if cpu == "native" else cpu
    return {"kind": "llvm", "mcpu": mcpu,
            "mtriple": "x86_64-linux-gnu", "num-cores": os.cpu_count() or 1,
            "fast-math-reassoc": True, "fast-math-contract": True}
