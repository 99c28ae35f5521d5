"""The kernels' thread pool: TVM's runtime library, loaded without TVM's compiler.

Parallel kernels call `TVMBackendParallelLaunch`, which lives in `libtvm_runtime.so` (shipped in
the apache-tvm wheel); it must be loaded, globally, before the kernel library. Its pool sizes
itself from TVM_NUM_THREADS when it starts and left alone ran one thread on our 2-core machines,
where a decode step then took 1.7-1.8x as long. So the runtime chooses: `threads=` on load,
else LLMC_NUM_THREADS, else TVM_NUM_THREADS if the user set it, else every core this process
may run on. The pool can shrink later in the process but not grow past its first size.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path

from .errors import LlmcError

log = logging.getLogger(__name__)

_POOL_SIZE: int | None = None  # threads the pool was started with, once loaded


def default_threads() -> int:
    for var in ("LLMC_NUM_THREADS", "TVM_NUM_THREADS"):
        text = os.environ.get(var)
        if text:
            try:
                n = int(text)
            except ValueError:
                raise LlmcError(f"{var}={text!r}: not a number of threads") from None
            if n < 1:
                raise LlmcError(f"{var}={text!r}: the number of threads must be at least 1")
            return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def import_tvm_ffi():
    """tvm_ffi (it loads libtvm_ffi.so, which TVM's runtime library links against). It imports
    torch whenever torch is installed (a workaround for a symbol clash on Windows), which cost a
    runtime process 1.6 s and 184 MB of resident memory for nothing (measured: 1.84 s and 226 MB
    against 0.20 s and 42 MB for the import): torch is hidden
    from that import unless the process has it already. Torch tensors still pass to the kernels
    later, through DLPack (the torch.compile backend's test runs that way too)."""
    if "tvm_ffi" in sys.modules or "torch" in sys.modules:
        import tvm_ffi

        return tvm_ffi
    sys.modules["torch"] = None  # makes `import torch` fail
    try:
        import tvm_ffi
    finally:
        del sys.modules["torch"]
    return tvm_ffi


def start(threads: int | None = None) -> int:
    """Load TVM's runtime library (once) with a pool of `threads` workers; returns the count."""
    global _POOL_SIZE
    if threads is not None and (type(threads) is not int or threads < 1):
        raise LlmcError(f"threads={threads!r}: the number of threads must be an integer of at least 1")
    n = threads or default_threads()
    tvm_ffi = import_tvm_ffi()

    if _POOL_SIZE is None:
        spec = importlib.util.find_spec("tvm")
        if spec is None or not spec.submodule_search_locations:
            raise LlmcError("TVM's runtime library is not installed: the runtime needs the apache-tvm wheel "
                            "(pip install 'llmc[runtime]')")
        os.environ["TVM_NUM_THREADS"] = str(n)  # read once, when the pool starts
        lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libtvm_runtime.so"
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        _POOL_SIZE = n
    elif n > _POOL_SIZE:
        log.warning("%d threads asked for, but this process's kernel pool started with %d; using %d",
                    n, _POOL_SIZE, _POOL_SIZE)
        n = _POOL_SIZE
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)  # 1: every core is a "big" one
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())
