"""OpenCL devices for opencl artifacts (`gpu.GpuExecutor`), through pyopencl (an optional
dependency: `pip install llmc[opencl]`): a phone's or a desktop's GPU, or pocl on the CPU.

An activation is a sub-buffer of the arena (OpenCL kernels take buffer objects, not pointers);
its offset is a multiple of the device's base address alignment. One in-order queue: kernels
run in the order they are enqueued, so intermediates can be shared between them.
"""

from __future__ import annotations

import numpy as np

from .errors import LlmcError


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


class OpenCLDevice:
    def __init__(self, index: int | None = None):
        cl = self.cl = opencl()
        found = devices()
        index = 0 if index is None else index
        if not 0 <= index < len(found):
            raise LlmcError(f"--device {index}: this machine has {len(found)} OpenCL devices (0..{len(found) - 1})")
        self.device = found[index]
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        self.align = self.device.mem_base_addr_align // 8  # given in bits

    def build(self, source: str, names: list[str]) -> dict:
        try:
            program = self.cl.Program(self.context, source).build()
        except self.cl.Error as e:
            raise LlmcError(f"the OpenCL driver could not build the kernels: {str(e).strip().splitlines()[-1]}") \
                from None
        found = set(program.kernel_names.split(";"))
        return {name: getattr(program, name) for name in names if name in found}

    def alloc(self, nbytes: int, zero: bool = False):
        buffer = self.cl.Buffer(self.context, self.cl.mem_flags.READ_WRITE, max(nbytes, 4))
        if zero:
            self.cl.enqueue_fill_buffer(self.queue, buffer, np.uint8(0), 0, max(nbytes, 4))
        return buffer

    def upload(self, array: np.ndarray):
        return self.cl.Buffer(self.context, self.cl.mem_flags.READ_ONLY | self.cl.mem_flags.COPY_HOST_PTR,
                              hostbuf=np.ascontiguousarray(array))

    def view(self, buffer, offset: int, nbytes: int):
        return buffer.get_sub_region(offset, nbytes)

    def write(self, ref, array: np.ndarray) -> None:
        self.cl.enqueue_copy(self.queue, ref, array)

    def read(self, ref, out: np.ndarray) -> None:
        self.cl.enqueue_copy(self.queue, out, ref)
        self.queue.finish()

    def copy(self, source, target, nbytes: int) -> None:
        self.cl.enqueue_copy(self.queue, target, source, byte_count=nbytes)

    def available(self) -> None:
        return None  # the device's memory is not counted here; an allocation that fails says so

    def launch(self, kernel, args: list, groups: tuple, threads: tuple) -> None:
        rank = 3 if groups[2] * threads[2] > 1 else 2 if groups[1] * threads[1] > 1 else 1
        kernel(self.queue, tuple(g * t for g, t in zip(groups[:rank], threads[:rank])), threads[:rank], *args)
