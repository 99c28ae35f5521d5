"""Build targets, as TVM target dicts (TVM 0.27 rejects target strings), and the CPU record an
artifact keeps of them (`llmc.runtime.cpu`)."""

from __future__ import annotations

import os

# Floating-point reassociation and contraction let LLVM vectorize reductions (attention's dot
# products over the head dim: attention ran 3-5x faster) and fuse multiply-adds. The other
# fast-math flags stay off: masks and empty softmax rows rely on -inf and NaN semantics.
FAST_MATH = {"fast-math-reassoc": True, "fast-math-contract": True}

# --cpu for arm64 -> the instruction-set features (as Linux names them) its kernels may use.
# The LLVM CPU name implies its LLVM features (dotprod, i8mm, sve, ...).
ARM64_CPUS = {
    "generic": ["asimd"],                                        # any ARMv8-A: NEON only
    "cortex-a55": ["asimd", "asimddp", "fphp", "asimdhp"],       # phones' little cores since 2018
    "cortex-a76": ["asimd", "asimddp", "fphp", "asimdhp"],       # phones' big cores, Raspberry Pi 5
    "neoverse-n1": ["asimd", "asimddp", "fphp", "asimdhp"],      # Graviton 2, Ampere Altra
    "neoverse-v1": ["asimd", "asimddp", "fphp", "asimdhp", "i8mm", "bf16", "sve"],  # Graviton 3
    "apple-m1": ["asimd", "asimddp", "fphp", "asimdhp"],         # Apple silicon under Linux
}


def host(cpu: str = "native") -> dict:
    """A CPU of this machine's architecture: "native" is this machine's CPU, whose LLVM name
    selects the vector ISA (AVX-512 on Zen 4/5 and Sapphire Rapids, AVX2 elsewhere); a portable
    level ("x86-64-v3": AVX2 and FMA; "x86-64-v4": AVX-512) is an LLVM CPU name too, and runs on
    every CPU of that level (`llmc.runtime.cpu`)."""
    import tvm

    mcpu = tvm.target.codegen.llvm_get_system_cpu() if cpu == "native" else cpu
    return {"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu", "num-cores": os.cpu_count() or 1,
            **FAST_MATH}


def arm64(cpu: str = "generic") -> dict:
    """An aarch64 Linux CPU (phones, boards, servers), cross-compiled from this machine."""
    return {"kind": "llvm", "mcpu": cpu, "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], **FAST_MATH}


def vector_registers(target: dict) -> tuple[int, int]:
    """(vector registers, f32 lanes in each) of a target's CPU, for the schedules' cost models."""
    import tvm
    from tvm.target import codegen

    t = tvm.target.Target(target)
    if "aarch64" in target.get("mtriple", ""):
        return 32, 4
    if codegen.llvm_cpu_has_features(["avx512f"], t):
        return 32, 16
    if codegen.llvm_cpu_has_features(["avx2"], t):
        return 16, 8
    return 16, 4
