"""The llmc runtime: loads an artifact and runs prefill and the decode loop.

It depends on numpy and the kernel runtime only, never on torch, onnx, onnxruntime or the TVM
compiler, so that an artifact runs where only the runtime is installed.

    model = llmc.runtime.load("model.llmc")
    new_tokens = model.generate([1, 2, 3], max_new_tokens=32)
"""


def load(path, threads: int | None = None, interpret: bool = False, device: int | None = None):
    """Open, verify and load an artifact (see `llmc.runtime.model.Model`); `threads`: the
    kernels' threads (default: every core this process may use, or $LLMC_NUM_THREADS). A cuda
    artifact runs on the GPU, or with `interpret` under Triton's interpreter on the CPU; an
    opencl artifact on OpenCL device number `device` (default 0; `llmc devices` lists them)."""
    from .model import load as _load

    return _load(path, threads, interpret, device)
