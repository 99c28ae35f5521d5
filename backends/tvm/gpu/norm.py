"""Norms that stand alone on GPUs (opencl, metal): `rms_norm`, `layer_norm`, `add_norm` and
`norm_add` (`tvm.norm.normalized`; most norms are GEMM prologues, `gpu.linear`).

A work-group per row, its `threads` threads over the features: each sums a strided share of
the row, the row's statistics (layer norm: the mean, then the squared deviations) meet in
cross-thread reductions, and each thread writes its share of the normalized row. One kernel.
add_norm's first output, the sum a + b, is a kernel of one thread per element beside it (the
norm reads a + b itself, so no kernel reads what another thread of it wrote).

Launch: the norm's rows over blockIdx.x (the last row dim), .y and .z (the ones before),
threadIdx.x = `threads`. Knob: `threads`.
"""

from __future__ import annotations

from .lowering import bind_reduction, rfactor, split_exactly
from ...knobs import Knob

OPS = ("rms_norm", "layer_norm", "add_norm", "norm_add")
THREADS = (128, 64, 256)
GRID = ("blockIdx.x", "blockIdx.y", "blockIdx.z")


def knobs() -> list[Knob]:
    return [Knob("threads", THREADS, 1)]


def schedule(func, config: dict | None = None):
    """`func` (an `injective.prim_func` of a norm) scheduled as the module docstring says."""
    import tvm

    threads = (config or {}).get("threads", THREADS[0])
    sch = tvm.s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("inv"))
    normed = sch.get_sblock("normed")
    *rows, features = sch.get_loops(normed)
    k = int(sch.get(features).extent)
    threads = split_exactly(k, threads, 1)[0]
    stages = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    names = ["total", "squares"] if "total" in stages else ["squares"]
    reductions = [sch.get_sblock(name) for name in names]
    partials = [rfactor(sch, block, threads) for block in reductions]
    if len(rows) > 3:
        rows = [sch.fuse(*rows[:-2]), *rows[-2:]]
    for loop, tag in zip(reversed(rows), GRID):
        sch.bind(loop, tag)
    row = rows[-1]
    sch.bind(sch.split(features, [None, threads])[1], "threadIdx.x")
    for block, partial in reversed(list(zip(reductions, partials))):
        sch.compute_at(block, row)
        sch.compute_at(partial, row)
    for block, partial in zip(reductions, partials):
        bind_reduction(sch, block, partial, len(rows))
    if "sum" in stages:  # add_norm's residual sum: its own kernel, a thread per element
        groups, items = sch.split(sch.fuse(*sch.get_loops(sch.get_sblock("sum"))), [None, 256])
        sch.bind(groups, "blockIdx.x")
        sch.bind(items, "threadIdx.x")
    return sch.mod
