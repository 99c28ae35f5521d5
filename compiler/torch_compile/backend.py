"""`torch.compile(model, backend="llmc")`: llmc as a TorchDynamo backend.

Installing the package registers the backend (entry point `torch_dynamo_backends`). Dynamo
hands over a graph; AOTAutograd lowers it to ATen ops and lifts the parameters to inputs. The
first call (with real tensors) compiles it:

1. the parameters, and the float scalars Dynamo lifts to 0-d inputs (a norm's epsilon), become
   constants: llmc packs, fuses and quantizes weights at compile time, as inductor's freezing
   does. The scalars are checked at every call and a change recompiles;
2. the graph is partitioned: the nodes the FX frontend converts form subgraphs that llmc
   compiles (frontend, pass pipeline, TVM kernels); the rest runs in PyTorch eager. What fell
   back and why is logged, and printed with `options={"report": True}`;
3. each compiled subgraph runs its kernel plan on torch tensors (`TorchPlan`).

Inference only: a graph that needs gradients runs in eager, with a log line saying so.

Options (`torch.compile(..., options={...})`): `target` ("cpu"), `quant` ("w8", "w4"),
`group_size`, `zero_point`, `activations` ("int8", the default, or "f32": what the quantized
GEMMs multiply, as `llmc.compile`'s), `report` (print what fell back), `dump_dir` (the IR after
every pass, per subgraph).
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
import os
from dataclasses import dataclass, field

from llmc.errors import LlmcError

log = logging.getLogger(__name__)

OPTIONS = {"target": "cpu", "quant": None, "group_size": 128, "zero_point": False, "activations": "int8",
           "report": False, "dump_dir": None}


@dataclass
class Report:
    """What one compiled graph became: subgraphs compiled by llmc, ATen nodes left to eager."""

    compiled_nodes: int = 0
    subgraphs: int = 0
    fallbacks: dict[str, list[str]] = field(default_factory=dict)  # reason -> FX node names

    def __str__(self) -> str:
        lines = [f"llmc: {self.compiled_nodes} ATen nodes compiled in {self.subgraphs} subgraph(s), "
                 f"{sum(len(v) for v in self.fallbacks.values())} run in eager"]
        for reason, nodes in sorted(self.fallbacks.items()):
            shown = ", ".join(nodes[:4]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 4 else "")
            lines.append(f"  eager: {reason}: {shown}")
        return "\n".join(lines)


REPORTS: list[Report] = []  # one per compiled graph, newest last


def llmc_backend(gm, example_inputs, options: dict | None = None):
    """The TorchDynamo backend function."""
    import torch
    from torch._dynamo.backends.common import aot_autograd

    opts = _options(options)
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        log.warning("llmc: this graph needs gradients; llmc compiles inference only, so it runs in "
                    "eager (call the model under torch.no_grad() or torch.inference_mode())")
        return gm.forward

    def forward_compiler(fx_module, fx_inputs):
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        static = set(context.fw_metadata.static_input_indices or []) if context and context.fw_metadata else set()
        return _LazyForward(fx_module, static - _written_inputs(fx_module), opts)

    return aot_autograd(fw_compiler=forward_compiler)(gm, example_inputs)


def _written_inputs(gm) -> set[int]:
    """Inputs the graph writes (a static KV cache, which `index_copy` updates): static addresses,
    but not constants."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {n.args[0] for n in gm.graph.nodes if n.op == "call_function" and "index_copy" in str(n.target)}
    return {i for i, p in enumerate(placeholders) if p in written}


def _options(options: dict | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise LlmcError(f"unknown llmc option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **options}
    if opts["target"] != "cpu":
        raise LlmcError(f"torch.compile backend: target {opts['target']!r} is not supported yet; supported: cpu")
    if opts["quant"] not in (None, "w8", "w4"):
        raise LlmcError(f"quantization {opts['quant']!r} is not supported; supported: w8, w4")
    if opts["activations"] not in ("int8", "f32"):
        raise LlmcError(f"activations {opts['activations']!r} are not supported; supported: int8, f32")
    return opts


class _LazyForward:
    """The compiled forward: built at its first call, when the weights' values are known."""

    def __init__(self, gm, static: set[int], opts: dict):
        self.gm, self.static, self.opts = gm, static, opts
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.impl = None
        self.scalars: dict[int, float] = {}

    def __call__(self, *args):
        if self.impl is None or any(float(args[i]) != v for i, v in self.scalars.items()):
            self._build(args)
        return self.impl(*args)

    def _build(self, args):
        import torch

        constants = {self.placeholders[i].name: args[i] for i in self.static}
        # float scalars Dynamo lifted to inputs: constants for this build, checked every call
        self.scalars = {i: float(a) for i, a in enumerate(args) if i not in self.static and
                        isinstance(a, torch.Tensor) and a.dim() == 0 and a.dtype.is_floating_point}
        constants.update({self.placeholders[i].name: args[i] for i in self.scalars})
        report = Report()
        _advise_omp_wait_policy()
        self.impl = partition_and_compile(self.gm, constants, self.opts, report)
        REPORTS.append(report)
        if self.opts["report"]:
            log.warning("%s", report)
        else:
            log.info("%s", report)


@functools.cache
def _advise_omp_wait_policy() -> None:
    """Once per process: torch's OpenMP threads spin after its parallel ops (libgomp's default)
    and take cycles from the llmc kernels that follow (docs/torch-compile.md, "Threads")."""
    if "OMP_WAIT_POLICY" not in os.environ:
        log.info("torch's OpenMP threads spin after torch's own parallel ops and slow the llmc kernels "
                 "that follow them; OMP_WAIT_POLICY=PASSIVE, set before the process starts, avoids it")


def partition_and_compile(gm, constants: dict, opts: dict, report: Report):
    """A GraphModule that runs the supported parts of `gm` as llmc subgraphs, the rest in eager.
    A node the frontend turns out not to convert, or that leaves an IR op no kernel runs, is
    moved to eager and the graph partitioned again; the kernels are built once all subgraphs
    plan."""
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    from llmc.frontends.fx.converters import CONVERTERS, SYM_OPS, op_key
    from llmc.frontends.fx.importer import FxConversionError

    rejected: dict[str, str] = {}  # FX node name -> why it runs in eager

    class Support(OperatorSupportBase):
        def is_node_supported(self, submodules, node) -> bool:
            if node.op != "call_function" or node.name in rejected:
                return False
            return node.target is operator.getitem or op_key(node.target) in CONVERTERS or \
                op_key(node.target) in SYM_OPS

    for node in gm.graph.nodes:
        if node.op == "call_function" and not Support().is_node_supported(None, node):
            rejected[node.name] = f"no converter for {node.target}"
    while True:
        module = copy.deepcopy(gm)
        partitioner = CapabilityBasedPartitioner(module, Support(), allows_single_node_partition=True)
        partitions = [p for p in partitioner.propose_partitions()
                      if any(n.op == "call_function" and n.target is not operator.getitem and
                             op_key(n.target) not in SYM_OPS for n in p.nodes)]
        fused = partitioner.fuse_partitions(partitions)
        try:
            planned = [(node.target, _Subgraph.plan(getattr(fused, node.target), node, constants, opts))
                       for node in fused.graph.nodes if node.op == "call_module"]
            break
        except FxConversionError as e:
            rejected[e.node_name] = str(e).split(": ", 1)[1]
        except _NoKernel as e:
            rejected.update({name: e.reason for name in e.nodes})
    for name, sub in planned:
        setattr(fused, name, sub.build())
    report.compiled_nodes = sum(sub.nodes for _, sub in planned)
    report.subgraphs = len(planned)
    for name, reason in rejected.items():
        report.fallbacks.setdefault(reason, []).append(name)
    fused.recompile()
    return fused


class _NoKernel(Exception):
    """FX nodes whose IR has no kernel: `nodes` go to eager."""

    def __init__(self, nodes: list[str], reason: str):
        self.nodes, self.reason = nodes, reason


class _Subgraph:
    """One supported subgraph through the FX frontend, the pass pipeline and kernel planning;
    `build` compiles its kernels and returns the module that stands in for it."""

    @staticmethod
    def plan(sub, call, constants: dict, opts: dict) -> "_Subgraph":
        from llmc.backends.tvm import target as targets
        from llmc.backends.tvm.backend import HOST
        from llmc.backends.knobs import Chooser
        from llmc.backends.tvm.compile import UnsupportedGraph, plan_graph
        from llmc.frontends.fx import from_fx
        from llmc.passes.manager import PassContext, run_passes
        from llmc.passes.pipeline import default_pipeline
        from llmc.tuning import Tuner

        self = _Subgraph()
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        mine = {ph.name: constants[arg.name] for ph, arg in zip(placeholders, call.args)
                if getattr(arg, "name", None) in constants}
        self.graph = from_fx(sub, mine, name=call.target)
        self.tensors = [i for i, n in enumerate(placeholders) if n.name not in mine and hasattr(n.meta["val"], "shape")]
        # SymInt arguments that are a plain size symbol are bound from the call's arguments
        self.sizes = [(i, str(n.meta["val"].node.expr)) for i, n in enumerate(placeholders)
                      if n.name not in mine and getattr(getattr(n.meta["val"], "node", None), "expr", None) is not None
                      and n.meta["val"].node.expr.is_Symbol]
        self.returns_tuple = isinstance(next(n for n in sub.graph.nodes if n.op == "output").args[0], (tuple, list))
        self.nodes = sum(1 for n in sub.graph.nodes if n.op == "call_function")
        options = {k: opts[k] for k in ("quant", "group_size", "zero_point", "activations") if opts[k]}
        dump = f"{opts['dump_dir']}/{call.target}" if opts["dump_dir"] else None
        self.graph = run_passes(self.graph, default_pipeline(), PassContext(options=options, dump_dir=dump))
        try:
            # kernels tuned on this machine (`llmc tune`, `llmc compile --tune`) are built as tuned
            tuner = Tuner(HOST.machine({"cpu": "native"}))
            self.funcs, self.plan = plan_graph(self.graph, targets.host(), Chooser(tuner))
        except UnsupportedGraph as e:
            # IR nodes are named after the FX node they came from (passes add suffixes)
            origin = e.node.split(".")[0]
            names = {n.name for n in sub.graph.nodes if n.op == "call_function"}
            raise _NoKernel([origin] if origin in names else sorted(names), f"no llmc kernel ({e})") from None
        return self

    def build(self):
        import torch
        import tvm

        from llmc.backends.tvm import target as targets

        from .runner import TorchPlan

        executable = tvm.compile(tvm.IRModule(self.funcs), target=tvm.target.Target(targets.host()))
        run = TorchPlan(self.graph, executable, self.plan, dim_inputs=[sym for _, sym in self.sizes])
        tensors, sizes, returns_tuple = self.tensors, self.sizes, self.returns_tuple

        class Subgraph(torch.nn.Module):
            """Stands in for the fused submodule: the parent graph calls it with the same arguments."""

            def forward(self, *args):
                outs = run(*[args[i] for i in tensors], *[args[i] for i, _ in sizes])
                return outs if returns_tuple else outs[0]

        return Subgraph()
