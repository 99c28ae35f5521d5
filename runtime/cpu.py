"""The CPU an artifact needs and the CPU it runs on.

An artifact's kernels use the vector instructions of the CPU they were compiled for; on a CPU
without them they die with SIGILL. The artifact records the instruction-set features its
kernels may use (`manifest.cpu`), named as Linux names them in /proc/cpuinfo, and loading checks
them against this CPU first, naming what is missing.

Portable levels are the x86-64 micro-architecture levels LLVM knows as CPU names; "native" is
this machine's CPU, and requires every instruction-set feature this CPU has that LLVM may use
for it (the list below), since LLVM is free to use any of them.
"""

from __future__ import annotations

import platform
from pathlib import Path

from .errors import ArtifactError

# x86-64 levels (the psABI's, as LLVM implements them), each adding to the one before (SSE3 is "pni")
_V2 = ["cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"]
_V3 = _V2 + ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"]
_V4 = _V3 + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
LEVELS = {"x86-64-v2": _V2, "x86-64-v3": _V3, "x86-64-v4": _V4}

# the instruction-set features beyond the levels that LLVM may use for a native build
_X86_EXTRA = ["avx512_vnni", "avx512_bf16", "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg",
              "avx512_vpopcntdq", "avx512ifma", "avx_vnni", "vpclmulqdq", "gfni", "vaes", "sha_ni",
              "amx_tile", "amx_int8", "amx_bf16", "amx_fp16"]
_ARM = ["asimd", "asimddp", "i8mm", "fphp", "asimdhp", "bf16", "sve", "sve2"]


def arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_features() -> set[str]:
    """This CPU's feature flags, as /proc/cpuinfo lists them ("flags" on x86, "Features" on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(rest.split())
    return set()


def model_name() -> str:
    """This CPU's model as /proc/cpuinfo names it ("model name" on x86, "CPU part" on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() in ("model name", "CPU part"):
            return rest.strip()
    return "unknown"


def required_features(level: str) -> list[str]:
    """The features an artifact compiled for `level` needs ("native": this CPU's)."""
    if level in LEVELS:
        return list(LEVELS[level])
    if level != "native":
        raise ValueError(f"unknown CPU level {level!r}; known: native, {', '.join(LEVELS)}")
    candidates = _V4 + _X86_EXTRA if arch() == "x86_64" else _ARM
    have = host_features()
    return [f for f in dict.fromkeys(candidates) if f in have]


def check(cpu: dict, where: str) -> None:
    """Refuse an artifact whose kernels this CPU cannot run, naming the missing features."""
    if cpu["arch"] != arch():
        raise ArtifactError(f"{where}: compiled for {cpu['arch']} ({cpu['name']}); this machine is {arch()}")
    have = host_features()
    missing = [f for f in cpu["features"] if f not in have]
    if have and missing:
        raise ArtifactError(f"{where}: compiled for CPU {cpu['name']!r}; this CPU lacks {', '.join(missing)} "
                            "(recompile with --cpu native on this machine, or a portable level it has, "
                            "e.g. --cpu x86-64-v3)")
