"""OpenCL kernels of an opencl artifact, through pyopencl (an optional dependency: `pip install
llmc[opencl]`).

A kernel group is the device source one TVM function became and its launch table
(`llmc.backends.tvm.gpu.build`): the kernels in launch order, each with its arguments (the
function's buffers by position, scalars as expressions over the run-time dims) and its launch
extents, evaluated at the step's dims (`dims.atom`). A work-group is the threadIdx extents; the
NDRange is blockIdx * threadIdx items on each axis.
"""

from __future__ import annotations

import numpy as np

from .dims import atom
from .errors import LlmcError

AXES = ("x", "y", "z")


def opencl():
    try:
        import pyopencl
    except ImportError:
        raise LlmcError("running an opencl artifact needs pyopencl: pip install 'llmc[opencl]'") from None
    return pyopencl


def devices() -> list:
    """Every OpenCL device of every platform, in platform order."""
    cl = opencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # the ICD loader found no platform
        platforms = []
    found = [d for p in platforms for d in p.get_devices()]
    if not found:
        raise LlmcError("no OpenCL device: install a driver (a GPU's, or pocl-opencl-icd for the CPU)")
    return found


class KernelGroup:
    """One function's kernels, built for a context."""

    def __init__(self, context, group: dict):
        cl = opencl()
        self.table, self.scratch = group["kernels"], group["scratch"]
        self.context = context
        try:
            program = cl.Program(context, group["source"]).build()
        except cl.Error as e:
            raise LlmcError(f"the OpenCL driver could not build {', '.join(k['name'] for k in self.table)}: "
                            f"{str(e).strip().splitlines()[-1]}") from None
        self.kernels = [getattr(program, k["name"]) for k in self.table]

    def scratch_bytes(self, env: dict[str, int]) -> list[int]:
        """The bytes of each intermediate the kernels pass on, at `env`."""
        return [atom(s["elements"], env) * np.dtype(s["dtype"]).itemsize for s in self.scratch]

    def __call__(self, queue, buffers: list, env: dict[str, int], scratch: list | None = None) -> None:
        """Enqueue every kernel on `queue`: `buffers` are the function's buffer parameters by
        position (pyopencl Buffers), `env` the run-time dims, `scratch` buffers of at least
        `scratch_bytes(env)` (made here when not given)."""
        if scratch is None:
            cl = opencl()
            scratch = [cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(n, 4)) for n in self.scratch_bytes(env)]
        for kernel, entry in zip(self.kernels, self.table):
            args = [buffers[a] if isinstance(a, int) else scratch[a["scratch"]] if isinstance(a, dict)
                    else np.dtype(a[1]).type(atom(a[0], env)) for a in entry["args"]]
            launch = entry["launch"]
            groups = [atom(launch.get(f"blockIdx.{a}", "1"), env) for a in AXES]
            local = [atom(launch.get(f"threadIdx.{a}", "1"), env) for a in AXES]
            if 0 in groups:
                continue  # nothing to do at these dims (an empty past)
            rank = max((i + 1 for i, a in enumerate(AXES) if f"blockIdx.{a}" in launch or f"threadIdx.{a}" in launch),
                       default=1)
            kernel(queue, tuple(g * t for g, t in zip(groups[:rank], local[:rank])), tuple(local[:rank]), *args)
