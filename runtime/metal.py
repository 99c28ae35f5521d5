"""Apple GPUs for metal artifacts (`gpu.GpuExecutor`), through Apple's Metal API from Python
(PyObjC's `pyobjc-framework-Metal`: `pip install 'llmc[metal]'`, macOS only).

Why Apple's API and not TVM's Metal runtime: the artifact carries kernel source and a launch
table, not a TVM module, and the runtime of the GPU targets imports no TVM (as on CUDA); PyObjC
is a thin, maintained binding of the API itself.

**Untested on hardware**: no Mac was reachable where this was written. `scripts/metal-check.sh`
runs its tests on a Mac; until then, treat this module as a draft.

Buffers are shared between the CPU and the GPU (Apple silicon has one memory): feeds are
written and logits read in place, after the step's command buffer completes. A step's kernels
are encoded into one command buffer, in order (a serial compute encoder: each dispatch sees the
previous one's writes). TVM's Metal kernels take their buffers at indices 0.. in parameter
order, then their scalars packed in one struct (C layout) at the next index.
"""

from __future__ import annotations

import sys

import numpy as np

from .errors import LlmcError


def metal():
    if sys.platform != "darwin":
        raise LlmcError("a metal artifact runs on an Apple GPU, on macOS (scripts/metal-check.sh tests it there); "
                        "compile with --target opencl to run on this machine")
    try:
        import Metal
    except ImportError:
        raise LlmcError("running a metal artifact needs PyObjC's Metal bindings: pip install 'llmc[metal]'") from None
    return Metal


def pack(scalars: list) -> bytes:
    """Scalars (numpy int32/int64) as the kernel's argument struct: C layout, each field at a
    multiple of its size, the whole a multiple of the largest."""
    out = b""
    for v in scalars:
        out += b"\0" * (-len(out) % v.itemsize) + v.tobytes()
    widest = max((v.itemsize for v in scalars), default=1)
    return out + b"\0" * (-len(out) % widest)


class MetalDevice:
    align = 256  # buffer offsets: the strictest of Apple GPUs' requirements

    def __init__(self):
        self.mtl = mtl = metal()
        self.device = mtl.MTLCreateSystemDefaultDevice()
        if self.device is None:
            raise LlmcError("this Mac has no Metal device")
        self.queue = self.device.newCommandQueue()
        self.command = self.encoder = None

    def build(self, source: str, names: list[str]) -> dict:
        library, error = self.device.newLibraryWithSource_options_error_(source, None, None)
        if library is None:
            raise LlmcError(f"Metal could not build the kernels: {error.localizedDescription()}")
        out = {}
        for name in names:
            function = library.newFunctionWithName_(name)
            if function is None:
                continue
            state, error = self.device.newComputePipelineStateWithFunction_error_(function, None)
            if state is None:
                raise LlmcError(f"Metal could not prepare kernel {name}: {error.localizedDescription()}")
            out[name] = state
        return out

    def alloc(self, nbytes: int, zero: bool = False):
        buffer = self.device.newBufferWithLength_options_(max(nbytes, 4), self.mtl.MTLResourceStorageModeShared)
        ref = (buffer, 0, max(nbytes, 4))
        if zero:
            self._bytes(ref)[:] = 0
        return ref

    def upload(self, array: np.ndarray):
        ref = self.alloc(array.nbytes)
        self._bytes(ref)[:array.nbytes] = array.reshape(-1).view(np.uint8)
        return ref

    def view(self, buffer, offset: int, nbytes: int):
        return (buffer[0], buffer[1] + offset, nbytes)

    def _bytes(self, ref) -> np.ndarray:
        buffer, offset, nbytes = ref
        memory = buffer.contents().as_buffer(buffer.length())
        return np.frombuffer(memory, np.uint8)[offset:offset + nbytes]

    def write(self, ref, array: np.ndarray) -> None:
        self._finish()
        self._bytes(ref)[:array.nbytes] = array.reshape(-1).view(np.uint8)

    def read(self, ref, out: np.ndarray) -> None:
        self._finish()
        out.reshape(-1).view(np.uint8)[:] = self._bytes(ref)[:out.nbytes]

    def copy(self, source, target, nbytes: int) -> None:
        self._finish()
        self._bytes(target)[:nbytes] = self._bytes(source)[:nbytes]

    def available(self) -> None:
        return None  # the device's memory is not counted here; an allocation that fails says so

    def launch(self, kernel, args: list, groups: tuple, threads: tuple) -> None:
        if self.encoder is None:
            self.command = self.queue.commandBuffer()
            self.encoder = self.command.computeCommandEncoder()
        self.encoder.setComputePipelineState_(kernel)
        buffers = [a for a in args if isinstance(a, tuple)]
        for index, (buffer, offset, _) in enumerate(buffers):
            self.encoder.setBuffer_offset_atIndex_(buffer, offset, index)
        scalars = [a for a in args if not isinstance(a, tuple)]
        if scalars:
            packed = pack(scalars)
            self.encoder.setBytes_length_atIndex_(packed, len(packed), len(buffers))
        self.encoder.dispatchThreadgroups_threadsPerThreadgroup_(self.mtl.MTLSizeMake(*groups),
                                                                 self.mtl.MTLSizeMake(*threads))

    def _finish(self) -> None:
        """Run what was encoded and wait for it."""
        if self.encoder is None:
            return
        self.encoder.endEncoding()
        self.command.commit()
        self.command.waitUntilCompleted()
        if self.command.error() is not None:
            raise LlmcError(f"a Metal kernel failed: {self.command.error().localizedDescription()}")
        self.command = self.encoder = None
