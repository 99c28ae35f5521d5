"""Run an opencl artifact through pyopencl (an optional dependency: `pip install llmc[opencl]`)
on an OpenCL device: a phone's or a desktop's GPU, or pocl on the CPU.

A kernel group is the device code one TVM function became and its launch table
(`llmc.backends.tvm.gpu.build`): the kernels in launch order, each with its arguments (the
function's buffers by position, intermediates in global memory, scalars as expressions over the
run-time dims) and its launch extents, evaluated at the step's dims (`dims.atom`). A work-group
is the threadIdx extents; the NDRange is blockIdx * threadIdx items on each axis.

The executor runs the artifact's plan as the CPU executor does: the weights uploaded once, the
KV caches allocated for a batch and written in place, the activations in one device buffer
planned by lifetime (`memory.py`), each value a sub-buffer of it at an offset the device can
address (its base address alignment). Feeds go up before a step; the logits come back after it.
"""

from __future__ import annotations

import numpy as np

from . import memory
from .dims import atom, evaluate
from .errors import ArtifactError, LlmcError
from .paging import check_step

AXES = ("x", "y", "z")


def opencl():
    try:
        import pyopencl
    except ImportError:
        raise LlmcError("running an opencl artifact needs pyopencl: pip install 'llmc[opencl]'") from None
    return pyopencl


def program(context, source: str):
    """`source` built for `context`'s device; an error naming the driver's complaint."""
    cl = opencl()
    try:
        return cl.Program(context, source).build()
    except cl.Error as e:
        raise LlmcError(f"the OpenCL driver could not build the kernels: {str(e).strip().splitlines()[-1]}") from None


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
    """One function's kernels, from a built program (`program(context, source)`)."""

    def __init__(self, program, group: dict):
        self.table, self.scratch = group["kernels"], group["scratch"]
        self.context = program.context
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


class OpenCLExecutor:
    pages = None  # contiguous caches only

    def __init__(self, art, manifest: dict, weights: dict[str, np.ndarray], device: int | None = None):
        cl = opencl()
        found = devices()
        index = 0 if device is None else device
        if not 0 <= index < len(found):
            raise LlmcError(f"--device {device}: this machine has {len(found)} OpenCL devices (0..{len(found) - 1})")
        self.device = found[index]
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        self.manifest, self.plan = manifest, manifest["plans"]["forward"]
        self.values = manifest["plans"]["values"]
        self.max_seq = manifest["model"]["max_seq_len"]
        self.logits = manifest["model"]["roles"]["logits"]
        kernels = manifest["kernels"]
        built = program(self.context, art.file(kernels["source"]).read_text())
        try:
            self.groups = {name: KernelGroup(built, group) for name, group in kernels["functions"].items()}
        except AttributeError as e:  # a kernel the table names is not in the source
            raise ArtifactError(f"{art.file(kernels['source'])}: {e}") from None
        flags = cl.mem_flags
        self.dummy = cl.Buffer(self.context, flags.READ_WRITE, 4)  # for arguments a kernel leaves unread
        self.weight_names = {name for name in weights if name in self.values}
        self.buffers = {name: cl.Buffer(self.context, flags.READ_ONLY | flags.COPY_HOST_PTR,
                                        hostbuf=np.ascontiguousarray(weights[name]))
                        if weights[name].size else self.dummy for name in self.weight_names}
        self.scratch: list = []
        self.batch = None

    def reset(self, batch: int) -> None:
        """Caches and activations for a batch (kept while the batch size is)."""
        if batch == self.batch:
            return
        cl = opencl()
        flags = cl.mem_flags
        env = {"batch": batch, "past": self.max_seq}
        for entry in self.manifest["model"]["kv_cache"]["entries"]:
            nbytes = max(memory.nbytes(self.values[entry["past"]], env), 4)
            cache = cl.Buffer(self.context, flags.READ_WRITE, nbytes)
            cl.enqueue_fill_buffer(self.queue, cache, np.uint8(0), 0, nbytes)
            self.buffers[entry["past"]] = self.buffers[entry["present"]] = cache
        align = max(memory.ALIGN, self.device.mem_base_addr_align // 8)
        offsets, sizes, size = memory.arena_plan(self.manifest, self.weight_names, batch, align)
        self.arena = cl.Buffer(self.context, flags.READ_WRITE, max(size, 4))
        for name, offset in offsets.items():
            self.buffers[name] = self.arena.get_sub_region(offset, sizes[name]) if sizes[name] else self.dummy
        self.buffers[""] = self.dummy
        self.batch = batch

    def run(self, feeds: dict[str, np.ndarray], batch: int, seq: int, past: int,
            last_logits: bool = False) -> np.ndarray:
        """As the CPU executor's `run`: the logits [batch, seq, vocab], or with `last_logits`
        the last position's, [batch, 1, vocab] (only those come back)."""
        cl = opencl()
        check_step(self.max_seq, self.batch, self.pages, batch, seq, past)
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        for name, a in feeds.items():
            if name in self.values and a.size:
                cl.enqueue_copy(self.queue, self.buffers[name],
                                np.ascontiguousarray(a, dtype=self.values[name]["dtype"]))
        for step in self.plan:
            group = self.groups[step["kernel"]]
            group(self.queue, [self.buffers[a] for a in step["args"]], env, self._scratch(group.scratch_bytes(env)))
        vocab = self.values[self.logits]["shape"][-1]
        rows = evaluate(self.values[self.logits]["shape"][1], env) if len(self.values[self.logits]["shape"]) == 3 \
            else seq
        logits = np.empty((batch, rows, vocab), np.float32)
        cl.enqueue_copy(self.queue, logits, self.buffers[self.logits])
        self.queue.finish()
        return logits[:, -1:] if last_logits else logits

    def _scratch(self, sizes: list[int]) -> list:
        """Buffers of at least `sizes` bytes for a group's intermediates; shared by every group
        (the queue runs one kernel at a time, in order), grown as a group needs."""
        cl = opencl()
        for i, n in enumerate(sizes):
            if i == len(self.scratch):
                self.scratch.append(None)
            if self.scratch[i] is None or self.scratch[i].size < n:
                self.scratch[i] = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(n, 4))
        return self.scratch[:len(sizes)]
