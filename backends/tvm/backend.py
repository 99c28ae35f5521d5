"""The TVM backend behind `llmc.compile(..., target="cpu")` (this machine's CPU, or a portable
x86-64 level) and `target="arm64"` (an aarch64 CPU, cross-compiled): one kernel library for the
whole plan."""

from __future__ import annotations

import os
from dataclasses import replace

from llmc.errors import LlmcError
from llmc.runtime import cpu as cpus

from .. import Build
from ..cache_layout import kv_layout

LIBRARY = "kernels/model.so"


class TvmBackend:
    name = "TVM"

    def __init__(self, arch: str):
        self.arch = arch  # "host" (this machine's) or "aarch64" (cross-compiled)
        self.in_process = arch == "host"

    def cpus(self) -> list[str]:
        from .target import ARM64_CPUS

        return list(ARM64_CPUS) if self.arch == "aarch64" else ["native", *cpus.LEVELS]

    def resolve(self, options):
        """Defaults: the first of `cpus()` ("native" on the host, "generic" on arm64), fp32, an
        f32 cache, int8 activations where the CPU has integer dot products."""
        cpu = options.cpu or self.cpus()[0]
        if cpu not in self.cpus():
            raise LlmcError(f"CPU {cpu!r} is not supported for this target; supported: {', '.join(self.cpus())}")
        if options.arch:
            raise LlmcError(f"--arch {options.arch}: GPU architectures are the cuda target's; a CPU target takes --cpu")
        if options.dtype not in (None, "fp32"):
            raise LlmcError(f"--dtype {options.dtype}: CPU targets compute in fp32 (use --quant to shrink the weights)")
        if options.activations not in (None, "int8", "f32"):
            raise LlmcError(f"activations {options.activations!r} are not supported; supported: int8, f32")
        if options.kv_cache not in (None, "f32", "int8"):
            raise LlmcError(f"KV cache {options.kv_cache!r} is not supported on CPUs; supported: f32, int8")
        return replace(options, cpu=cpu, dtype="fp32", kv_cache=options.kv_cache or "f32",
                       activations=options.activations or self._activations(cpu))

    def machine(self, options) -> dict:
        """What tuning results are kept for (`llmc.tuning`): the CPU the kernels are built for
        and, on this machine, its model and the cores the kernels run on."""
        if self.arch == "aarch64":
            return {"arch": "aarch64", "cpu": options.cpu}
        return {"arch": cpus.arch(), "cpu": self.target(options.cpu)["mcpu"], "model": cpus.model_name(),
                "cores": len(os.sched_getaffinity(0))}

    def can_measure(self, options) -> str:
        """Why this machine cannot time the kernels ("" when it can)."""
        if self.arch == "aarch64":
            return "the arm64 target is cross-compiled: its kernels cannot be timed on this machine"
        return ""

    def target(self, cpu: str) -> dict:
        from . import target

        return target.arm64(cpu) if self.arch == "aarch64" else target.host(cpu)

    def _activations(self, cpu: str) -> str:
        import tvm

        from . import int_dot

        return "int8" if int_dot.choose(tvm.target.Target(self.target(cpu))) else "f32"

    def build(self, graph, options, tuner=None) -> Build:
        from llmc import toolchain

        from .compile import compile_graph, lay_out_caches, weights
        from .target import ARM64_CPUS

        caches = lay_out_caches(graph, options.kv_cache, *kv_layout(options.kv_layout))
        tvm_target = self.target(options.cpu)
        if self.arch == "aarch64":
            cpu = {"name": options.cpu, "arch": "aarch64", "features": ARM64_CPUS[options.cpu]}
            export = {"fcompile": toolchain.shared_library_linker("aarch64")}
            toolchain.compiler("aarch64")  # no toolchain: say so before the kernels are built
        else:
            cpu = {"name": tvm_target["mcpu"], "arch": cpus.arch(), "features": cpus.required_features(options.cpu)}
            export = {}
        executable, functions, plan, tuning = compile_graph(graph, tvm_target, tuner)
        kernels = {"library": LIBRARY, "functions": functions, "tuning": tuning}
        return Build(target=tvm_target, cpu=cpu, kernels=kernels, plan=plan,
                     values=caches, weights=weights(graph, plan),
                     files={LIBRARY: lambda path: executable.export_library(str(path), **export)},
                     loaded=executable if self.in_process else None)


HOST = TvmBackend("host")
ARM64 = TvmBackend("aarch64")
