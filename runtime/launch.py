"""How a Triton kernel of an artifact is launched: which kernel (a GEMM of few rows runs its
GEMV), its grid at the run-time dims, and its arguments after the buffers (D = [past, total] in
device memory, batch, seq). Both executors of CUDA artifacts use this: the Triton interpreter's
(`interpret.py`) and the CUDA driver's (`cuda.py`)."""

from __future__ import annotations

import math

from .dims import evaluate


def pick(kernels: dict, name: str, env: dict[str, int]) -> str:
    """The kernel to launch for `name` at `env`: its decode variant when the rows are few."""
    decode = kernels[name].get("decode")
    if decode and evaluate(decode["rows"], env) <= decode["max_rows"]:
        return decode["kernel"]
    return name


def grid(kernel: dict, env: dict[str, int]) -> tuple[int, int, int]:
    """Each grid dim is a product of cdiv(polynomial, block) factors (an empty product is 1)."""
    return tuple(math.prod(-(-evaluate(poly, env) // block) for poly, block in factors)
                 for factors in kernel["grid"])


def largest(env: dict[str, int], max_seq: int) -> dict[str, int]:
    """The dims at which a captured step's grids are sized: its batch and seq, the longest
    context (kernels read the current one from D and leave the rest)."""
    return dict(env, past=max_seq - env["seq"], total=max_seq)
