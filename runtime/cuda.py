"""Run a cuda artifact on an NVIDIA GPU through the CUDA driver API (ctypes on libcuda; no
torch, no Triton at run time).

Loading picks the cubins for the GPU found (the same architecture, else an older one of the
same major version, which NVIDIA GPUs run); memory is the executor core's (`executor.py`: the
weights uploaded once, the KV caches, one activation arena planned by lifetime) on device
allocations (`CudaDevice`). Every kernel reads past and total from device memory (D), so a decode step
is captured once per batch size as a CUDA graph, with the copies of D and of the feeds (from
pinned host buffers) at its start, and replayed for every token; its grids are sized for the
longest context, and programs past the current one do nothing. Prefill launches its kernels
one by one. Only the last position's logits come back, or in greedy decoding only the next
token (the artifact's argmax kernel, at the end of the step).

Each Triton cubin's entry takes the kernel's arguments, then D, batch and seq, then the scratch
pointers Triton appends (`scratch_args`, passed as NULL: kernels that need scratch memory are
refused when the artifact is loaded).
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import launch, memory
from .errors import ArtifactError, LlmcError
from .executor import Executor

_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
_CAPTURE_THREAD_LOCAL = 1
_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING
ALIGN = 256


class Driver:
    """The few driver calls used, each checked: a failure raises LlmcError naming the call."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            raise LlmcError("this is a cuda artifact and this machine has no CUDA driver (libcuda.so.1): run it "
                            "on an NVIDIA GPU, or with --interpret under Triton's interpreter (slow)") from None
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self("cuInit", ctypes.c_uint(0))

    def __call__(self, name: str, *args):
        result = getattr(self.lib, name)(*args)
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise LlmcError(f"CUDA {name} failed: {(text.value or b'error %d' % result).decode()}")

    def host(self, nbytes: int) -> np.ndarray:
        """Pinned host memory (a copy from it can be captured in a graph), as bytes."""
        ptr = ctypes.c_void_p()
        self("cuMemAllocHost_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, ALIGN)))
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, ALIGN)).from_address(ptr.value))


class Allocation(int):
    """A device allocation's address, freed when no longer referenced, after the work enqueued
    before (which may still read it: a pool that grew copies its old blocks)."""

    def __new__(cls, device: "CudaDevice", nbytes: int):
        ptr = ctypes.c_uint64()
        device.cu("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, ALIGN)))
        self = super().__new__(cls, ptr.value)
        self.device = device
        return self

    def __del__(self):
        cu = self.device.cu
        cu("cuStreamSynchronize", self.device.stream)
        cu("cuMemFree_v2", ctypes.c_uint64(self))


class CudaDevice:
    """The executor core's device (`executor.Device`) for the first GPU: buffers are device
    addresses, work goes on one stream (non-blocking: no implicit sync with the legacy stream)."""

    align = ALIGN

    def __init__(self):
        self.cu = cu = Driver()
        self.device = ctypes.c_int()
        cu("cuDeviceGet", ctypes.byref(self.device), 0)
        self.context = ctypes.c_void_p()
        cu("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), self.device)
        cu("cuCtxSetCurrent", self.context)
        self.stream = ctypes.c_void_p()
        cu("cuStreamCreate", ctypes.byref(self.stream), _NON_BLOCKING)

    def capability(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.cu("cuDeviceGetAttribute", ctypes.byref(major), _CC_MAJOR, self.device)
        self.cu("cuDeviceGetAttribute", ctypes.byref(minor), _CC_MINOR, self.device)
        return major.value, minor.value

    def alloc(self, nbytes: int, zero: bool = False) -> Allocation:
        buffer = Allocation(self, nbytes)
        if zero:
            self.cu("cuMemsetD8Async", ctypes.c_uint64(buffer), ctypes.c_ubyte(0), ctypes.c_size_t(nbytes),
                    self.stream)
        return buffer

    def upload(self, array: np.ndarray) -> Allocation:
        buffer = Allocation(self, array.nbytes)
        array = np.ascontiguousarray(array)
        self.cu("cuMemcpyHtoD_v2", ctypes.c_uint64(buffer), array.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_size_t(array.nbytes))
        return buffer

    def view(self, buffer: int, offset: int, nbytes: int) -> int:
        return int(buffer) + offset

    def copy(self, source: int, target: int, nbytes: int) -> None:
        self.cu("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(target), ctypes.c_uint64(source), ctypes.c_size_t(nbytes),
                self.stream)

    def available(self) -> None:
        return None  # an allocation the GPU cannot give fails, naming the call


class CudaExecutor(Executor):
    def __init__(self, art, manifest: dict, weights: dict[str, np.ndarray]):
        device = CudaDevice()
        self.cu, self.stream = device.cu, device.stream
        self.kernels = manifest["kernels"]["functions"]
        arch = self._arch(manifest, *device.capability(), str(art.file("manifest.json")))
        self.functions = {name: self._load(art, name, k["binaries"][arch]) for name, k in self.kernels.items()}
        super().__init__(device, manifest, weights)
        self.argmax = manifest["kernels"].get("argmax")  # greedy decoding on the device
        self.use_graphs = True  # False: decode steps too are launched kernel by kernel (tests)
        self.graphs: dict = {}

    @staticmethod
    def _arch(manifest: dict, major: int, minor: int, where: str) -> str:
        """The cubins this GPU runs: its own architecture's, else an older minor version's of the
        same major (sm_90 cubins are sm_90a code: Hopper's alone)."""
        have = manifest["kernels"]["archs"]
        fits = [a for a in have if a == f"sm_{major}{minor}" or
                (major != 9 and a.startswith(f"sm_{major}") and int(a[3 + len(str(major)):]) <= minor)]
        if not fits:
            raise ArtifactError(f"{where}: the artifact has cubins for {', '.join(have)}; this GPU is "
                                f"sm_{major}{minor} (recompile with --arch sm_{major}{minor})")
        return max(fits)

    def _load(self, art, name: str, binary: dict):
        if binary["global_scratch_size"] or binary["profile_scratch_size"]:
            raise ArtifactError(f"kernels.functions[{name!r}]: the kernel needs Triton scratch memory, which this "
                                "runtime does not provide")
        cubin = art.file(binary["cubin"]).read_bytes()
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        self.cu("cuModuleLoadData", ctypes.byref(module), ctypes.c_char_p(cubin))
        self.cu("cuModuleGetFunction", ctypes.byref(function), module, binary["symbol"].encode())
        if binary["shared"] > 48 * 1024:
            self.cu("cuFuncSetAttribute", function, _MAX_DYNAMIC_SHARED, binary["shared"])
        return function, binary

    def reset(self, batch: int) -> None:
        """The core's caches and arena, and pinned staging for the batch's feeds and results."""
        fresh = batch != self.batch
        super().reset(batch)
        if fresh:
            cu = self.cu
            self.dims_host = cu.host(8).view(np.int32)[:2]
            self.dims_device = self.device.alloc(8)
            self.staging: dict[str, np.ndarray] = {}
            vocab = self.values[self.logits]["shape"][-1]
            self.logits_host = cu.host(batch * vocab * 4).view(np.float32)[:batch * vocab].reshape(batch, 1, vocab)
            self.tokens_host = cu.host(batch * 4).view(np.int32)[:batch]
            self.tokens_device = self.device.alloc(batch * 4)

    def _unbind(self) -> None:
        self.graphs = {}  # captured over the old caches

    def _step(self, feeds, env, last_logits: bool = False, greedy: bool = False) -> np.ndarray:
        """The last position's logits [batch, 1, vocab] (whatever `last_logits` asks: only those
        come back from the GPU), in a pinned buffer reused by the next step, or with `greedy` each
        sequence's next token [batch] (the argmax kernel's: 4 bytes a sequence come back)."""
        if greedy and not self.argmax:
            raise LlmcError("this artifact has no argmax kernel for greedy decoding on the device")
        cu = self.cu
        batch, seq = env["batch"], env["seq"]
        self.dims_host[:] = env["past"], env["total"]
        for name, a in feeds.items():
            if name in self.values:
                self._stage(name, a, env)
        if seq == 1 and self.use_graphs:
            graph = self.graphs.get((batch, greedy))
            if graph is None:
                graph = self.graphs[batch, greedy] = self._capture(feeds, env, greedy)
            cu("cuGraphLaunch", graph, self.stream)
        else:
            self._enqueue(feeds, env, env, greedy)
        if greedy:
            cu("cuMemcpyDtoHAsync_v2", self.tokens_host.ctypes.data_as(ctypes.c_void_p),
               ctypes.c_uint64(self.tokens_device), ctypes.c_size_t(batch * 4), self.stream)
            cu("cuStreamSynchronize", self.stream)
            return self.tokens_host
        vocab = self.logits_host.shape[-1]
        for b in range(batch):  # the last position of each sequence
            row = self.buffers[self.logits] + ((b * seq + seq - 1) * vocab) * 4
            cu("cuMemcpyDtoHAsync_v2", self.logits_host[b].ctypes.data_as(ctypes.c_void_p), ctypes.c_uint64(row),
               ctypes.c_size_t(vocab * 4), self.stream)
        cu("cuStreamSynchronize", self.stream)
        return self.logits_host

    def _stage(self, name: str, a: np.ndarray, env) -> None:
        """The feed into its pinned buffer (sized for the longest prompt and context)."""
        info = self.values[name]
        buf = self.staging.get(name)
        if buf is None:  # a paged cache's steps may hold fewer sequences than the batch
            longest = {"batch": self.batch, "seq": self.max_seq, "past": self.max_seq, "total": self.max_seq}
            buf = self.staging[name] = self.cu.host(memory.nbytes(info, longest)).view(info["dtype"])
        flat = np.ascontiguousarray(a, dtype=info["dtype"]).ravel()
        buf[:flat.size] = flat

    def _enqueue(self, feeds, env, grid_env, greedy: bool) -> None:
        """The copies of D and the feeds, then every kernel (and with `greedy` the argmax), on
        the stream; copies and grids are sized at `grid_env` (the step's own dims, or the
        longest context when capturing)."""
        cu = self.cu
        cu("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(self.dims_device), self.dims_host.ctypes.data_as(ctypes.c_void_p),
           ctypes.c_size_t(8), self.stream)
        for name in feeds:
            if name in self.values:
                nbytes = memory.nbytes(self.values[name], grid_env)
                cu("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(self.buffers[name]),
                   self.staging[name].ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(nbytes), self.stream)
        for step in self.plan:
            self._launch(launch.pick(self.kernels, step["kernel"], env),
                         [self.buffers[a] for a in step["args"]], env, grid_env)
        if greedy:
            self._launch(self.argmax, [self.buffers[self.logits], self.tokens_device], env, grid_env)

    def _launch(self, name: str, pointers: list[int], env, grid_env) -> None:
        """One kernel: its buffers, D, batch, seq, and Triton's scratch pointers (NULL)."""
        (function, binary), kernel = self.functions[name], self.kernels[name]
        grid = launch.grid(kernel, grid_env)
        if 0 in grid:
            return
        args = [ctypes.c_uint64(p) for p in pointers]
        args += [ctypes.c_uint64(self.dims_device), ctypes.c_int32(env["batch"]), ctypes.c_int32(env["seq"])]
        args += [ctypes.c_uint64(0)] * binary["scratch_args"]
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.cu("cuLaunchKernel", function, *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(32 * kernel["num_warps"]),
                ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(binary["shared"]), self.stream, params, None)

    def _capture(self, feeds, env, greedy: bool):
        """The decode step as a CUDA graph, grids sized for the longest context."""
        cu = self.cu
        graph, executable = ctypes.c_void_p(), ctypes.c_void_p()
        cu("cuStreamBeginCapture_v2", self.stream, _CAPTURE_THREAD_LOCAL)
        self._enqueue(feeds, env, launch.largest(env, self.max_seq), greedy)
        cu("cuStreamEndCapture", self.stream, ctypes.byref(graph))
        cu("cuGraphInstantiateWithFlags", ctypes.byref(executable), graph, ctypes.c_ulonglong(0))
        return executable
