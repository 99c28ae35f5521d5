"""The TVM backend behind `llmc.compile(..., target="cpu")`: this machine's CPU (or a portable
x86-64 level), one kernel library for the whole plan."""

from __future__ import annotations

from llmc.errors import LlmcError
from llmc.runtime import cpu as cpus

from .. import Build

LIBRARY = "kernels/model.so"


class TvmBackend:
    name = "TVM"

    def check(self, options: dict) -> None:
        cpu = options["cpu"]
        if cpu != "native" and cpu not in cpus.LEVELS:
            raise LlmcError(f"CPU {cpu!r} is not supported; supported: native, {', '.join(cpus.LEVELS)}")
        if options["dtype"] != "fp32":
            raise LlmcError(f"--dtype {options['dtype']}: the cpu target computes in fp32 (use --quant to shrink "
                            "the weights)")
        if options["activations"] not in (None, "int8", "f32"):
            raise LlmcError(f"activations {options['activations']!r} are not supported; supported: int8, f32")
        if options["kv_cache"] not in ("f32", "int8"):
            raise LlmcError(f"KV cache {options['kv_cache']!r} is not supported on cpu; supported: f32, int8")

    def default_activations(self, options: dict) -> str:
        import tvm

        from . import int_dot, target

        return "int8" if int_dot.choose(tvm.target.Target(target.host(options["cpu"]))) else "f32"

    def build(self, graph, options: dict) -> Build:
        from . import target as targets
        from .compile import compile_graph, lay_out_caches, weights

        caches = lay_out_caches(graph, options["kv_cache"])
        tvm_target = targets.host(options["cpu"])
        cpu = {"name": tvm_target["mcpu"], "arch": cpus.arch(), "features": cpus.required_features(options["cpu"])}
        executable, functions, plan = compile_graph(graph, tvm_target)
        return Build(target=tvm_target, cpu=cpu, kernels={"library": LIBRARY, "functions": functions}, plan=plan,
                     values=caches, weights=weights(graph, plan),
                     files={LIBRARY: lambda path: executable.export_library(str(path))})


BACKEND = TvmBackend()
