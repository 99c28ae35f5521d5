"""Run an opencl or metal artifact: its plan over device buffers, each kernel launched from the
artifact's launch table. The device is a thin layer (`opencl.OpenCLDevice`, `metal.MetalDevice`):
build the source, allocate, copy, launch.

A kernel group is the device code one TVM function became and its launch table
(`llmc.backends.tvm.gpu.lowering`): the kernels in launch order, each with its arguments (the function's
buffers by position, intermediates in global memory, scalars as expressions over the run-time
dims) and its launch extents, evaluated at the step's dims (`dims.atom`): a grid of blockIdx
work-groups of threadIdx threads on each axis.

Memory is the executor core's (`executor.Executor`): the weights uploaded once, the KV caches
allocated for a batch and written in place, the activations in one device buffer planned by
lifetime, each value at an offset the device can address. Feeds go up before a step; the logits
come back after it (for generation, the last position's).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .dims import atom, evaluate
from .errors import ArtifactError
from .executor import Device, Executor

AXES = ("x", "y", "z")


class GpuDevice(Device, Protocol):
    """A device that also moves bytes to and from the host and builds and launches OpenCL or
    Metal kernels."""

    def write(self, ref, array: np.ndarray) -> None:
        """`array`'s bytes into `ref` (a buffer or a view)."""

    def read(self, ref, out: np.ndarray) -> None:
        """`ref`'s first bytes into `out`, after everything enqueued before."""

    def build(self, source: str, names: list[str]) -> dict:
        """The kernels `names` of `source`, built: {name: handle}."""

    def launch(self, kernel, args: list, groups: tuple, threads: tuple) -> None:
        """Enqueue `kernel` over `groups` work-groups of `threads`; `args`: buffers (views) and
        numpy scalars, in the kernel's parameter order."""


class KernelGroup:
    """One function's kernels and their launch table."""

    def __init__(self, device: Device, built: dict, group: dict):
        self.device, self.table, self.scratch = device, group["kernels"], group["scratch"]
        self.kernels = [built[k["name"]] for k in self.table]

    def scratch_bytes(self, env: dict[str, int]) -> list[int]:
        """The bytes of each intermediate the kernels pass on, at `env`."""
        return [atom(s["elements"], env) * np.dtype(s["dtype"]).itemsize for s in self.scratch]

    def __call__(self, buffers: list, env: dict[str, int], scratch: list | None = None) -> None:
        """Enqueue every kernel: `buffers` are the function's buffer parameters by position, `env`
        the run-time dims, `scratch` buffers of at least `scratch_bytes(env)` (made here when not
        given)."""
        if scratch is None:
            scratch = [self.device.alloc(n) for n in self.scratch_bytes(env)]
        for kernel, entry in zip(self.kernels, self.table):
            args = [buffers[a] if isinstance(a, int) else scratch[a["scratch"]] if isinstance(a, dict)
                    else np.dtype(a[1]).type(atom(a[0], env)) for a in entry["args"]]
            launch = entry["launch"]
            groups = tuple(atom(launch.get(f"blockIdx.{a}", "1"), env) for a in AXES)
            threads = tuple(atom(launch.get(f"threadIdx.{a}", "1"), env) for a in AXES)
            if 0 not in groups:  # an empty grid: nothing to do at these dims (an empty past)
                self.device.launch(kernel, args, groups, threads)


def kernel_names(kernels: dict) -> list[str]:
    """Every device kernel the manifest's tables name."""
    return [k["name"] for group in kernels["functions"].values() for k in group["kernels"]]


class GpuExecutor(Executor):
    def __init__(self, device: GpuDevice, art, manifest: dict, weights: dict[str, np.ndarray]):
        super().__init__(device, manifest, weights)
        kernels = manifest["kernels"]
        source = art.file(kernels["source"])
        built = device.build(source.read_text(), kernel_names(kernels))
        missing = [n for n in kernel_names(kernels) if n not in built]
        if missing:
            raise ArtifactError(f"{source}: no kernel {missing[0]} in the source")
        self.groups = {name: KernelGroup(device, built, group) for name, group in kernels["functions"].items()}
        self.scratch: list = []

    def _step(self, feeds, env, last_logits: bool = False) -> np.ndarray:
        """The logits [batch, seq, vocab], or with `last_logits` the last position's,
        [batch, 1, vocab]."""
        for name, a in feeds.items():
            if name in self.values and a.size:
                self.device.write(self.buffers[name], np.ascontiguousarray(a, dtype=self.values[name]["dtype"]))
        for step in self.plan:
            group = self.groups[step["kernel"]]
            group([self.buffers[a] for a in step["args"]], env, self._scratch(group.scratch_bytes(env)))
        shape = [evaluate(d, env) for d in self.values[self.logits]["shape"]]
        logits = np.empty((env["batch"], shape[1] if len(shape) == 3 else env["seq"], shape[-1]), np.float32)
        self.device.read(self.buffers[self.logits], logits)
        return logits[:, -1:] if last_logits else logits

    def _scratch(self, sizes: list[int]) -> list:
        """Buffers of at least `sizes` bytes for a group's intermediates; shared by every group
        (the device runs the kernels in the order they were enqueued), grown as one needs."""
        for i, n in enumerate(sizes):
            if i == len(self.scratch):
                self.scratch.append((0, None))
            if self.scratch[i][0] < n:
                self.scratch[i] = (n, self.device.alloc(n))
        return [buffer for _, buffer in self.scratch[:len(sizes)]]
