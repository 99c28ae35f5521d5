"""This machine's streaming read bandwidth: the ceiling of a batch-1 decode, which reads every
weight once per token.

A single method undercounts: torch's sum read 49.8 GB/s at the start of one benchmark run in
which llmc's own decode then read 69.8 GB/s. So the figure is the best of several streaming-read
kernels over data larger than any last-level cache (torch's sum, numpy's sum on one thread per
core, and llmc's own f32 GEMV kernel, the decode's access pattern), and a benchmark measures it
before and after its systems and keeps the best. A system that still reads faster than this is
a measurement problem, and is reported as one.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BYTES = 1 << 30  # 1 GiB: several times any L3 of the machines we run on


def _best(fn, seconds: float) -> float:
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return BYTES / best / 1e9


def torch_sum(seconds: float = 1.0) -> float:
    import torch

    a = torch.ones(BYTES // 4)
    return _best(a.sum, seconds)


def numpy_threads(seconds: float = 1.0) -> float:
    a = np.ones(BYTES // 4, np.float32)
    cores = len(os.sched_getaffinity(0))
    parts = np.array_split(a, cores)
    with ThreadPoolExecutor(cores) as pool:  # numpy's reductions release the GIL
        return _best(lambda: list(pool.map(np.sum, parts)), seconds)


def llmc_gemv(seconds: float = 1.0) -> float:
    from llmc.backends.tvm.linear import LinearSpec, build, pack
    from llmc.backends.tvm.target import host
    from llmc.runtime.host import aligned_empty

    n = k = int((BYTES // 4) ** 0.5)
    w, x, y = aligned_empty((n // 64, k, 64), np.float32), aligned_empty((1, k), np.float32), aligned_empty((1, n), np.float32)
    w[...] = pack(np.ones((n, k), np.float32))  # the kernels read 64-byte aligned memory
    x[...] = 1
    kernel = build(LinearSpec(n, k), host())["main"]
    return _best(lambda: kernel(x, w, y), seconds)


METHODS = {"torch sum": torch_sum, "numpy sum, a thread per core": numpy_threads, "llmc f32 GEMV": llmc_gemv}


def read_bandwidth(seconds: float = 1.0) -> dict[str, float]:
    """GB/s by method, and "best"."""
    out = {name: round(fn(seconds), 1) for name, fn in METHODS.items()}
    out["best"] = max(out.values())
    return out
