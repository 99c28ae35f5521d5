"""Run a cuda artifact on an NVIDIA GPU through the CUDA driver API (ctypes on libcuda; no
torch, no Triton at run time).

Loading picks the cubins for the GPU found (the same architecture, else an older one of the
same major version, which NVIDIA GPUs run), uploads the weights once into one device buffer,
and allocates the KV caches and one activation arena planned by lifetime, as the CPU executor
does (`memory.py`). Every kernel reads past and total from device memory (D), so a decode step
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
from .paging import BlockPool, check_step

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

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, ALIGN)))
        return ptr.value

    def host(self, nbytes: int) -> np.ndarray:
        """Pinned host memory (a copy from it can be captured in a graph), as bytes."""
        ptr = ctypes.c_void_p()
        self("cuMemAllocHost_v2", ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, ALIGN)))
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, ALIGN)).from_address(ptr.value))


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class CudaExecutor:
    def __init__(self, art, manifest: dict, weights: dict[str, np.ndarray]):
        self.cu = cu = Driver()
        self.manifest, self.plan = manifest, manifest["plans"]["forward"]
        self.values, self.kernels = manifest["plans"]["values"], manifest["kernels"]["functions"]
        self.max_seq = manifest["model"]["max_seq_len"]
        self.logits = manifest["model"]["roles"]["logits"]
        self.kv_entries = manifest["model"]["kv_cache"]["entries"]
        device = ctypes.c_int()
        cu("cuDeviceGet", ctypes.byref(device), 0)
        major, minor = ctypes.c_int(), ctypes.c_int()
        cu("cuDeviceGetAttribute", ctypes.byref(major), _CC_MAJOR, device)
        cu("cuDeviceGetAttribute", ctypes.byref(minor), _CC_MINOR, device)
        arch = self._arch(manifest, major.value, minor.value, str(art.file("manifest.json")))
        self.context = ctypes.c_void_p()
        cu("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), device)
        cu("cuCtxSetCurrent", self.context)
        self.stream = ctypes.c_void_p()
        cu("cuStreamCreate", ctypes.byref(self.stream), _NON_BLOCKING)  # no implicit sync with the legacy stream
        self.functions = {name: self._load(art, name, k["binaries"][arch]) for name, k in self.kernels.items()}
        # the weights, once, in one buffer; a dummy for the slots a kernel leaves unread
        offsets, total = {}, 0
        for name, w in weights.items():
            if name in self.values:
                offsets[name], total = total, _align(total + w.nbytes)
        self.weight_buffer = cu.alloc(total + ALIGN)
        for name, offset in offsets.items():
            w = np.ascontiguousarray(weights[name])
            cu("cuMemcpyHtoD_v2", ctypes.c_uint64(self.weight_buffer + offset), w.ctypes.data_as(ctypes.c_void_p),
               ctypes.c_size_t(w.nbytes))
        self.addresses = {name: self.weight_buffer + offset for name, offset in offsets.items()}
        self.addresses[""] = self.weight_buffer + total
        self.weight_names = set(offsets)
        self.argmax = manifest["kernels"].get("argmax")  # greedy decoding on the device
        self.batch = None
        self.pages: BlockPool | None = None
        self.caches: dict[str, tuple[int, int]] = {}  # {past: (address, bytes)}
        self.use_graphs = True  # False: decode steps too are launched kernel by kernel (tests)

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
        """Caches, arena and pinned staging for a batch; graphs are captured anew. A paged
        cache's pool keeps its blocks, all free again, as the CPU executor's does."""
        if batch == self.batch:
            if self.pages:
                self.pages.clear()
            return
        cu = self.cu
        page = self.manifest["model"]["kv_cache"]["layout"]["page_tokens"]
        self.pages = BlockPool(page, -(-self.max_seq // page), batch, self._grow) if page else None
        self._allocate_caches({"batch": batch, "past": self.max_seq, "blocks": batch})
        offsets, _, size = memory.arena_plan(self.manifest, self.weight_names, batch)
        arena = cu.alloc(size + ALIGN)
        self.addresses.update({name: arena + offset for name, offset in offsets.items()})
        self.dims_host = cu.host(8).view(np.int32)[:2]
        self.dims_device = cu.alloc(8)
        self.staging: dict[str, np.ndarray] = {}
        vocab = self.values[self.logits]["shape"][-1]
        self.logits_host = cu.host(batch * vocab * 4).view(np.float32)[:batch * vocab].reshape(batch, 1, vocab)
        self.tokens_host = cu.host(batch * 4).view(np.int32)[:batch]
        self.tokens_device = cu.alloc(batch * 4)
        self.graphs = {}
        self.batch = batch

    def _allocate_caches(self, env: dict, keep: bool = False) -> None:
        """The KV caches at `env`'s sizes, replacing (and freeing) the ones before. A paged pool
        starts zeroed, as the CPU executor's; with `keep` (a pool that grows) the old blocks are
        copied to its front. Graphs captured on the old caches are captured anew."""
        cu = self.cu
        cu("cuStreamSynchronize", self.stream)  # nothing in flight reads the old caches
        olds = []
        for entry in self.kv_entries:
            nbytes = memory.nbytes(self.values[entry["past"]], env)
            address = cu.alloc(nbytes)
            old, old_bytes = self.caches.get(entry["past"], (0, 0))
            olds += [old] * bool(old)
            if self.pages:
                cu("cuMemsetD8Async", ctypes.c_uint64(address), ctypes.c_ubyte(0), ctypes.c_size_t(nbytes),
                   self.stream)
            if keep and old:
                cu("cuMemcpyDtoDAsync_v2", ctypes.c_uint64(address), ctypes.c_uint64(old),
                   ctypes.c_size_t(min(old_bytes, nbytes)), self.stream)
            self.caches[entry["past"]] = (address, nbytes)
            self.addresses[entry["past"]] = self.addresses[entry["present"]] = address
        cu("cuStreamSynchronize", self.stream)
        for old in olds:
            cu("cuMemFree_v2", ctypes.c_uint64(old))
        self.graphs = {}

    def _grow(self, blocks: int) -> None:
        """A paged cache's pool grows to `blocks` blocks (`paging.BlockPool`)."""
        self._allocate_caches({"batch": self.batch, "past": self.max_seq, "blocks": blocks}, keep=True)

    def run(self, feeds: dict[str, np.ndarray], batch: int, seq: int, past: int,
            last_logits: bool = False, greedy: bool = False) -> np.ndarray:
        """As the CPU executor's `run`; returns the last position's logits [batch, 1, vocab]
        (whatever `last_logits` asks: only those come back from the GPU), or with `greedy` each
        sequence's next token [batch] (the argmax kernel's: 4 bytes a sequence come back)."""
        if greedy and not self.argmax:
            raise LlmcError("this artifact has no argmax kernel for greedy decoding on the device")
        check_step(self.max_seq, self.batch, self.pages, batch, seq, past)
        cu = self.cu
        env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
        self.dims_host[:] = past, past + seq
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
            row = self.addresses[self.logits] + ((b * seq + seq - 1) * vocab) * 4
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
                cu("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(self.addresses[name]),
                   self.staging[name].ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(nbytes), self.stream)
        for step in self.plan:
            self._launch(launch.pick(self.kernels, step["kernel"], env),
                         [self.addresses[a] for a in step["args"]], env, grid_env)
        if greedy:
            self._launch(self.argmax, [self.addresses[self.logits], self.tokens_device], env, grid_env)

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
