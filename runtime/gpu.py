"""Run an opencl or metal artifact: its plan over device buffers, each kernel launched from the
artifact's launch table. The device is a thin layer (`opencl.OpenCLDevice`, `metal.MetalDevice`):
build the source, allocate, copy, launch.

A kernel group is the device code one TVM function became and its launch table
(`llmc.backends.tvm.gpu.lowering`): the kernels in launch order, each with its arguments (the function's
buffers by position, intermediates in global memory, scalars as expressions over the run-time
dims) and its launch extents, evaluated at the step's dims (`dims.atom`): a grid of blockIdx
work-groups of threadIdx threads on each axis.

The executor runs the plan as the CPU executor does: the weights uploaded once, the KV caches
allocated for a batch (zeroed) and written in place, the activations in one device buffer
planned by lifetime (`memory.py`), each value at an offset the device can address. Feeds go up
before a step; the logits come back after it (for generation, the last position's).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from . import memory
from .dims import atom, evaluate
from .errors import ArtifactError
from .paging import BlockPool, check_step

AXES = ("x", "y", "z")


class Device(Protocol):
    align: int  # the byte alignment of a buffer offset the device can address

    def build(self, source: str, names: list[str]) -> dict:
        """The kernels `names` of `source`, built: {name: handle}."""

    def alloc(self, nbytes: int, zero: bool = False):
        """A device buffer of `nbytes` (at least 4)."""

    def upload(self, array: np.ndarray):
        """A device buffer holding `array`."""

    def view(self, buffer, offset: int, nbytes: int):
        """`nbytes` of `buffer` from `offset` (a multiple of `align`), as kernels take buffers."""

    def write(self, ref, array: np.ndarray) -> None:
        """`array` into `ref` (a buffer or a view)."""

    def read(self, ref, out: np.ndarray) -> None:
        """`ref`'s first bytes into `out`, after everything enqueued before."""

    def copy(self, source, target, nbytes: int) -> None:
        """`source`'s first `nbytes` into `target`, after everything enqueued before."""

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


class GpuExecutor:
    def __init__(self, device: Device, art, manifest: dict, weights: dict[str, np.ndarray]):
        self.device = device
        self.manifest, self.plan = manifest, manifest["plans"]["forward"]
        self.values = manifest["plans"]["values"]
        self.max_seq = manifest["model"]["max_seq_len"]
        self.logits = manifest["model"]["roles"]["logits"]
        kernels = manifest["kernels"]
        source = art.file(kernels["source"])
        built = device.build(source.read_text(), kernel_names(kernels))
        missing = [n for n in kernel_names(kernels) if n not in built]
        if missing:
            raise ArtifactError(f"{source}: no kernel {missing[0]} in the source")
        self.groups = {name: KernelGroup(device, built, group) for name, group in kernels["functions"].items()}
        self.dummy = device.alloc(4)  # for arguments a kernel leaves unread
        self.weight_names = {name for name in weights if name in self.values}
        self.buffers = {name: device.upload(np.ascontiguousarray(weights[name])) if weights[name].size else self.dummy
                        for name in self.weight_names}
        self.scratch: list = []
        self.batch = None
        self.pages: BlockPool | None = None
        self.caches: dict[str, tuple] = {}  # {past: (buffer, bytes)}

    def reset(self, batch: int) -> None:
        """Caches and activations for a batch (kept while the batch size is). A paged cache's
        pool keeps its blocks, all free again, as the CPU executor's does."""
        if batch == self.batch:
            if self.pages:
                self.pages.clear()
            return
        page = self.manifest["model"]["kv_cache"]["layout"]["page_tokens"]
        self.pages = BlockPool(page, -(-self.max_seq // page), batch, self._grow) if page else None
        self.caches = {}
        self._allocate_caches({"batch": batch, "past": self.max_seq, "blocks": batch})
        align = max(memory.ALIGN, self.device.align)
        offsets, sizes, size = memory.arena_plan(self.manifest, self.weight_names, batch, align)
        arena = self.device.alloc(size)
        for name, offset in offsets.items():
            self.buffers[name] = self.device.view(arena, offset, sizes[name]) if sizes[name] else self.dummy
        self.buffers[""] = self.dummy
        self.batch = batch

    def _allocate_caches(self, env: dict, keep: bool = False) -> None:
        """The KV caches at `env`'s sizes, zeroed (a paged pool's unwritten slots are read and
        masked out: a zero weight times garbage could be NaN); with `keep` (a pool that grows)
        the old ones copied to their front."""
        for entry in self.manifest["model"]["kv_cache"]["entries"]:
            nbytes = memory.nbytes(self.values[entry["past"]], env)
            cache = self.device.alloc(nbytes, zero=True)
            if keep and entry["past"] in self.caches:
                old, old_bytes = self.caches[entry["past"]]
                self.device.copy(old, cache, min(old_bytes, nbytes))
            self.caches[entry["past"]] = (cache, nbytes)
            self.buffers[entry["past"]] = self.buffers[entry["present"]] = cache

    def _grow(self, blocks: int) -> None:
        """A paged cache's pool grows to `blocks` blocks (`paging.BlockPool`)."""
        self._allocate_caches({"batch": self.batch, "past": self.max_seq, "blocks": blocks}, keep=True)

    def run(self, feeds: dict[str, np.ndarray], batch: int, seq: int, past: int,
            last_logits: bool = False) -> np.ndarray:
        """As the CPU executor's `run`: the logits [batch, seq, vocab], or with `last_logits`
        the last position's, [batch, 1, vocab]."""
        check_step(self.max_seq, self.batch, self.pages, batch, seq, past)
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        for name, a in feeds.items():
            if name in self.values and a.size:
                self.device.write(self.buffers[name], np.ascontiguousarray(a, dtype=self.values[name]["dtype"]))
        for step in self.plan:
            group = self.groups[step["kernel"]]
            group([self.buffers[a] for a in step["args"]], env, self._scratch(group.scratch_bytes(env)))
        shape = [evaluate(d, env) for d in self.values[self.logits]["shape"]]
        logits = np.empty((batch, shape[1] if len(shape) == 3 else seq, shape[-1]), np.float32)
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
