"""libllmc, the native runtime as a library, through ctypes: a CPU artifact's kernels run on its
loader and thread pool (runtime/native/kernels.c, pool.c), the ones `llmc-run` uses.

TVM's own pool (libtvm_runtime) wakes a sleeping worker for each of a decode step's ~220
parallel kernels; on a busy machine each wake-up waits for a time slice, and the Python runtime
lost 83-88% of its decode speed to two `nice -n 19` busy loops. libllmc's workers spin between
launches. A step's kernel calls are laid out once per shape as tvm-ffi packed arguments
(DLPack tensors over the executor's buffers) and run by one C call, so a decode step costs one
ctypes call instead of ~220 Python calls.

libllmc is built when llmc is installed (setup.py: a C library beside this module, not a Python
extension); a missing or unloadable one is an error naming the file, never a silent fallback.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import numpy as np

from .dims import atom
from .errors import ArtifactError, LlmcError

MAX_DIMS = 8
_DLPACK = {"float32": (2, 32), "float16": (2, 16), "int64": (0, 64), "int32": (0, 32), "int16": (0, 16),
           "int8": (0, 8), "uint8": (1, 8), "bool": (6, 8)}
_TENSOR, _INT = 7, 1  # tvm-ffi type indices: a DLTensor pointer, an int64


class Call(ctypes.Structure):
    _fields_ = [("kernel", ctypes.c_int32), ("n_args", ctypes.c_int32), ("n_dims", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("args", ctypes.c_void_p), ("dim_slots", ctypes.c_void_p)]


def library_path() -> Path:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"libllmc{suffix}"
        if path.exists():
            return path
    return here / f"libllmc{importlib.machinery.EXTENSION_SUFFIXES[0]}"


@functools.cache
def library() -> ctypes.CDLL:
    path = library_path()
    if not path.exists():
        raise LlmcError(f"{path}: libllmc, the native runtime the Python runtime runs CPU artifacts on, is not "
                        f"built: reinstall llmc (pip install builds it with the C compiler)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise LlmcError(f"{path}: cannot load libllmc ({e})") from None
    lib.llmc_kernels_load.restype = ctypes.c_void_p
    lib.llmc_kernels_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
    lib.llmc_kernels_threads.argtypes = [ctypes.c_void_p]
    lib.llmc_kernels_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.llmc_kernels_free.argtypes = [ctypes.c_void_p]
    lib.llmc_last_error.restype = ctypes.c_char_p
    return lib


def last_error() -> str:
    return library().llmc_last_error().decode("utf-8", "replace")


class KernelLibrary:
    """A CPU artifact's kernel library, loaded by libllmc with `threads` threads (the process's
    pool starts with the first library's count; a later one may use fewer, not more)."""

    def __init__(self, path: Path, names: list[str], threads: int):
        lib = library()
        self.index = {name: i for i, name in enumerate(names)}
        encoded = (ctypes.c_char_p * len(names))(*(n.encode() for n in names))
        handle = lib.llmc_kernels_load(str(path).encode(), encoded, len(names), threads)
        if not handle:
            raise ArtifactError(last_error())
        self.handle, self.threads = handle, lib.llmc_kernels_threads(handle)
        self._free = lib.llmc_kernels_free
        self._run = lib.llmc_kernels_run

    def __del__(self):
        if getattr(self, "handle", None):
            self._free(self.handle)

    def bind(self, calls: list) -> "Calls":
        return Calls(self, calls)


class Calls:
    """A step's kernel calls (executor.Call: kernel, arguments, growing arguments, copies, dims,
    whether the dims are the last position's) laid out for libllmc: DLTensors over the argument
    arrays, packed arguments, and the dims as slots into a vector filled per run (each atom at
    the step's env, then at its last position's). A run re-points the growing arguments, then
    runs the calls in segments, with the copies a segment needs done before it."""

    def __init__(self, kernels: KernelLibrary, calls: list):
        self.kernels = kernels
        self.atoms = sorted({d for c in calls for d in c.dims})
        slot = {text: 2 * i for i, text in enumerate(self.atoms)}
        n_tensors = sum(len(c.args) for c in calls)
        self.tensors = np.zeros((n_tensors, 6), np.int64)  # DLTensor: data, device, ndim|dtype, shape, strides, offset
        self.shapes = np.zeros((n_tensors, MAX_DIMS), np.int64)
        self.packed = np.zeros((sum(len(c.args) + len(c.dims) for c in calls), 2), np.int64)
        self.slots = np.zeros(max(1, sum(len(c.dims) for c in calls)), np.int32)
        self.dims = np.zeros(max(1, 2 * len(self.atoms)), np.int64)
        self.table = (Call * len(calls))()
        self.arrays = []  # the argument arrays, kept alive while the calls point at them
        self.growing = {}  # maker -> the tensor rows it makes
        self.segments = []  # (first call, end, copies before it)
        t = p = s = 0
        for i, c in enumerate(calls):
            if c.copies or not self.segments:
                self.segments.append([i, i, c.copies])
            self.segments[-1][1] = i + 1
            self.table[i] = Call(kernels.index[c.kernel], len(c.args) + len(c.dims), len(c.dims), 0,
                                 self.packed[p:].ctypes.data, self.slots[s:].ctypes.data)
            for j, a in enumerate(c.args):
                self.packed[p] = (_TENSOR, self.tensors[t:].ctypes.data)
                self.tensors[t, 3] = self.shapes[t:].ctypes.data
                self.tensors[t, 1] = 1  # kDLCPU, device 0
                self._point(t, a)
                if j in c.growing:
                    self.growing.setdefault(c.growing[j], []).append(t)
                else:
                    self.arrays.append(a)
                t, p = t + 1, p + 1
            for d in c.dims:
                self.packed[p] = (_INT, 0)
                self.slots[s] = slot[d] + c.last
                p, s = p + 1, s + 1

    def _point(self, row: int, a: np.ndarray) -> None:
        if not a.flags.c_contiguous or a.ndim > MAX_DIMS:
            raise LlmcError(f"a kernel argument of shape {a.shape} is not a contiguous array")
        code, bits = _DLPACK[a.dtype.name]
        self.tensors[row, 0] = a.ctypes.data
        self.tensors[row, 2] = a.ndim | (code | bits << 8 | 1 << 16) << 32
        self.shapes[row, :a.ndim] = a.shape

    def run(self, env: dict, last_env: dict, seconds: np.ndarray | None = None) -> None:
        """Run every call (`seconds`: each call's time added to it); a kernel that refuses its
        arguments raises KernelRefused."""
        for i, text in enumerate(self.atoms):
            self.dims[2 * i] = atom(text, env)
            self.dims[2 * i + 1] = atom(text, last_env)
        for make, rows in self.growing.items():  # views of memory the executor keeps
            a = make(env)
            self.tensors[rows, 0] = a.ctypes.data
            self.shapes[rows, :a.ndim] = a.shape
        dims = self.dims.ctypes.data
        table = ctypes.addressof(self.table)
        times = seconds.ctypes.data if seconds is not None else None
        for start, end, copies in self.segments:
            for dst, src in copies:
                dst[...] = src
            rc = self.kernels._run(self.kernels.handle, table + start * ctypes.sizeof(Call), end - start, dims,
                                   times and times + start * 8)
            if rc:
                raise KernelRefused(start - rc - 1, last_error())


class KernelRefused(Exception):
    """Call `index` of a run failed: a kernel refused its arguments (`message`)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index, self.message = index, message
