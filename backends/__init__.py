"""Backends turn a passed graph into kernels, a plan of kernel calls and the files of an
artifact, behind one small interface that the compile driver picks by target: `tvm` (x86 and
arm64 CPUs; OpenCL and Metal GPUs) and `triton` (CUDA). The numpy executor that defines what a
graph means is the IR's (`llmc.ir.evaluate`), not a backend. A new target is a new entry of
BACKENDS and a module implementing `Backend`; the driver does not change."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from llmc.options import CompileOptions

# target -> "module:object" of the Backend that builds for it (imported only when asked for)
BACKENDS = {"cpu": "llmc.backends.tvm.backend:HOST", "arm64": "llmc.backends.tvm.backend:ARM64",
            "cuda": "llmc.backends.triton.backend:BACKEND", "opencl": "llmc.backends.tvm.gpu.backend:OPENCL",
            "metal": "llmc.backends.tvm.gpu.backend:METAL"}


@dataclass
class Build:
    """What a backend makes of a passed graph. `values`: the plan values the backend lays out
    itself (the KV caches, scratch), {name: (dtype, shape)}; `weights`: {name: an array, or a
    function of no arguments making it (a packed copy is made only while the artifact is written,
    one at a time)}; `files`: {artifact path: a function writing that file at the path it is
    given}."""

    target: dict
    cpu: dict | None  # the CPU features the kernels need (`llmc.runtime.cpu`); None for GPU code
    kernels: dict
    plan: list
    values: dict
    weights: dict
    files: dict[str, Callable] = field(default_factory=dict)
    loaded: object = None  # the kernels loaded in this process, by name (targets that run here)


class Backend(Protocol):
    """The only place that knows a target: its defaults, the option values it honors, its
    kernels. Every method but `resolve` takes options `resolve` returned."""

    name: str  # the code generator, as progress shows it ("TVM", "Triton")
    in_process: bool  # its builds' kernels run in this process (`Build.loaded`; torch.compile needs it)

    def resolve(self, options: CompileOptions) -> CompileOptions:
        """`options` with this target's defaults filled in (`dtype`, `kv_cache`, `activations`:
        what quantized GEMMs multiply, `cpu` or `arch`); refuses (LlmcError) what it cannot
        honor, before any kernel is built."""

    def machine(self, options: CompileOptions) -> dict:
        """What tuning results are kept for: the machine the kernels are built for, as the
        tuning table keys it (`llmc.tuning`)."""

    def can_measure(self, options: CompileOptions) -> str:
        """Why this machine cannot time the kernels for `options` ("" when it can)."""

    def build(self, graph, options: CompileOptions, tuner=None) -> Build:
        """Kernels and plan for a graph the pass pipeline has run over; `tuner` gives each
        kernel with knobs its configuration (`llmc.tuning.Tuner`; None: the knobs' defaults)."""


def for_target(target: str) -> Backend:
    module, name = BACKENDS[target].split(":")
    return getattr(importlib.import_module(module), name)
