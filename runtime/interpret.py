"""Run a CUDA artifact's Triton kernels under Triton's interpreter, on the CPU (`llmc run
--interpret`): for tests and debugging, slow, and needs torch and triton.

The kernels are the Triton source the artifact carries (`kernels/triton/`, listed and
checksummed like every file), imported as a package with the interpreter on. Each kernel of the
plan becomes a function of numpy buffers and the run-time dims, so the CPU executor runs the
plan unchanged: its arena, caches and views are numpy arrays, which torch wraps without a copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
from pathlib import Path

import numpy as np

from . import launch
from .errors import LlmcError

_loaded = itertools.count()


def load_package(folder: Path, modules) -> dict:
    """Import the Triton source modules in `folder` (a package: it has __init__.py). Whether
    `triton.jit` makes interpreted or compilable functions is decided once per process, by
    TRITON_INTERPRET when triton is first imported (`interpreting`)."""
    name = f"_llmc_triton_{next(_loaded)}"
    spec = importlib.util.spec_from_file_location(name, Path(folder) / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return {m: importlib.import_module(f"{name}.{m}") for m in modules}


def interpreting() -> None:
    """Turn Triton's interpreter on for this process; an error if triton was imported without it
    (its language functions are then compiled-only)."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise LlmcError("Triton's interpreter must be switched on before triton is imported: "
                        "run with TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"


def _tensor(a: np.ndarray, dtype: str):
    import torch

    t = torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(a.copy())
    return t.view(torch.bfloat16) if dtype == "*bf16" else t


def functions(folder: Path, kernels: dict) -> dict:
    """{kernel name: f(*buffers, past, total, batch, seq)} for the executor."""
    interpreting()
    import torch

    modules = load_package(folder, sorted({k["module"] for k in kernels.values()}))
    dims = torch.zeros(2, dtype=torch.int32)

    def launcher(name: str):
        def call(*args):
            buffers, (past, total, batch, seq) = args[:-4], args[-4:]
            env = {"past": past, "total": total, "batch": batch, "seq": seq}
            kernel = kernels[launch.pick(kernels, name, env)]
            fn = getattr(modules[kernel["module"]], kernel["function"])
            dims[0], dims[1] = past, total
            tensors = [_tensor(np.asarray(b), t) for b, t in zip(buffers, kernel["signature"])]
            fn[launch.grid(kernel, env)](*tensors, dims, batch, seq, **kernel["constexprs"])
        return call
    return {name: launcher(name) for name in kernels}
