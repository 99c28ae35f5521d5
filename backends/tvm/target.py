"""Build targets, as TVM target dicts (TVM 0.27 rejects target strings)."""

from __future__ import annotations

import os


def host() -> dict:
    """This machine's CPU: LLVM's name for it selects the vector ISA (AVX-512 on Zen 4/5 and
    Sapphire Rapids, AVX2 elsewhere).

    Floating-point reassociation and contraction let LLVM vectorize reductions (attention's dot
    products over the head dim: attention ran 3-5x faster) and fuse multiply-adds. The other
    fast-math flags stay off: masks and empty softmax rows rely on -inf and NaN semantics."""
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "mtriple": "x86_64-linux-gnu", "num-cores": os.cpu_count() or 1,
            "fast-math-reassoc": True, "fast-math-contract": True}
