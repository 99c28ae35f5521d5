"""Backends turn a passed graph into kernels, a plan of kernel calls and the files of an
artifact, behind one small interface that the compile driver picks by target: `tvm` (x86 and
arm64 CPUs; OpenCL and Metal GPUs) and `triton` (CUDA). The numpy executor that defines what a
graph means is the IR's (`llmc.ir.evaluate`), not a backend. A new target is a new entry of
BACKENDS and a module implementing `Backend`; the driver does not change."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

# target -> "module:object" of the Backend that builds for it (imported only when asked for)
BACKENDS = {"cpu": "llmc.backends.tvm.backend:HOST", "arm64": "llmc.backends.tvm.backend:ARM64",
            "cuda": "llmc.backends.triton.backend:BACKEND", "opencl": "llmc.backends.tvm.gpu_backend:OPENCL",
            "metal": "llmc.backends.tvm.gpu_backend:METAL"}


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


class Backend(Protocol):
    name: str  # the code generator, as progress shows it ("TVM", "Triton")

    def check(self, options: dict) -> None:
        """Refuse options this backend cannot honor (LlmcError), before anything is imported."""

    def default_activations(self, options: dict) -> str:
        """What quantized GEMMs multiply unless told: "int8" where the target has integer dot
        products, else "f32" (`llmc.passes.quantize_activations`)."""

    def machine(self, options: dict) -> dict:
        """What tuning results are kept for: the machine the kernels are built for, as the
        tuning table keys it (`llmc.tuning`)."""

    def can_measure(self, options: dict) -> str:
        """Why this machine cannot time the kernels for `options` ("" when it can)."""

    def build(self, graph, options: dict) -> Build:
        """Kernels and plan for a graph the pass pipeline has run over; `options["tuner"]` gives
        each kernel with knobs its configuration (`llmc.tuning.Tuner`)."""


def for_target(target: str) -> Backend:
    module, name = BACKENDS[target].split(":")
    return getattr(importlib.import_module(module), name)
