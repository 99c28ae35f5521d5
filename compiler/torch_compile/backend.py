"""`torch.compile(model, backend="llmc")`: llmc as a TorchDynamo backend.

Installing the package registers the backend (entry point `torch_dynamo_backends`). Dynamo
hands over a graph; AOTAutograd lowers it to ATen ops and lifts the parameters to inputs. The
first call (with real tensors) compiles it:

1. the parameters, and the float scalars Dynamo lifts to 0-d inputs (a norm's epsilon), become
   constants: llmc packs, fuses and quantizes weights at compile time, as inductor's freezing
   does. The scalars are checked at every call and a change recompiles;
2. the graph is partitioned: the nodes the FX frontend converts form subgraphs that llmc
   compiles (frontend, pass pipeline, the target's backend, as `llmc compile` does); the rest
   runs in PyTorch eager. What fell back and why is logged, and printed with
   `options={"report": True}`;
3. each compiled subgraph runs its kernel plan on torch tensors (`TorchPlan`).

Inference only: a graph that needs gradients runs in eager, with a log line saying so.

Options (`torch.compile(..., options={...})`): `target`, `cpu`, `quant`, `group_size`,
`zero_point`, `activations`, as `llmc.compile` takes them (a `CompileOptions`; the target must
be one whose kernels run in this process: "cpu"), `report` (print what fell back), `dump_dir`
(the IR after every pass, per subgraph).
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

COMPILE_OPTIONS = ("target", "cpu", "quant", "group_size", "zero_point", "activations")
OWN_OPTIONS = {"report": False, "dump_dir": None}
MAX_ROUNDS = 4  # partitions tried; a subgraph that still fails after them runs in eager


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
    """{"compile": the resolved CompileOptions, and this backend's own options}."""
    from llmc import backends
    from llmc.options import CompileOptions

    options = dict(options or {})
    unknown = set(options) - set(COMPILE_OPTIONS) - set(OWN_OPTIONS)
    if unknown:
        raise LlmcError(f"unknown llmc option(s) {sorted(unknown)}; known: {', '.join(COMPILE_OPTIONS)}, "
                        f"{', '.join(OWN_OPTIONS)}")
    compile_options = CompileOptions.of(max_seq_len=None, **{k: v for k, v in options.items() if k in COMPILE_OPTIONS})
    if not compile_options.backend().in_process:
        here = [t for t in backends.BACKENDS if backends.for_target(t).in_process]
        raise LlmcError(f"torch.compile backend: target {compile_options.target!r} builds kernels that do not run in "
                        f"this process; supported: {', '.join(here)}")
    return {**OWN_OPTIONS, **{k: v for k, v in options.items() if k in OWN_OPTIONS},
            "compile": compile_options.resolved()}


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
    Each round partitions the nodes not yet rejected and builds every subgraph not built
    before, recording every node that does not convert or leaves an IR op no kernel runs; they
    go to eager together and the next round partitions again. After MAX_ROUNDS, a subgraph that
    still fails runs in eager as it is."""
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase

    from llmc.frontends.fx.converters import CONVERTERS, SYM_OPS, op_key

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
    built: dict[frozenset, object] = {}  # a subgraph's FX nodes -> its build, kept across rounds
    for _ in range(MAX_ROUNDS):
        module = copy.deepcopy(gm)
        partitioner = CapabilityBasedPartitioner(module, Support(), allows_single_node_partition=True)
        partitions = [p for p in partitioner.propose_partitions()
                      if any(n.op == "call_function" and n.target is not operator.getitem and
                             op_key(n.target) not in SYM_OPS for n in p.nodes)]
        fused = partitioner.fuse_partitions(partitions)
        subgraphs, failed = [], {}
        for node in fused.graph.nodes:
            if node.op != "call_module":
                continue
            sub = getattr(fused, node.target)
            key = frozenset(n.name for n in sub.graph.nodes if n.op == "call_function")
            if key not in built:
                try:
                    built[key] = _Subgraph.build(sub, node, constants, opts)
                except _Unsupported as e:
                    failed.update(e.reasons)
                    continue
            subgraphs.append((node.target, built[key]))
        if not failed:
            break
        rejected.update(failed)
    for name, sub in subgraphs:
        setattr(fused, name, sub.module())
    report.compiled_nodes = sum(sub.nodes for _, sub in subgraphs)
    report.subgraphs = len(subgraphs)
    for name, reason in rejected.items():
        report.fallbacks.setdefault(reason, []).append(name)
    fused.recompile()
    return fused


class _Unsupported(Exception):
    """FX nodes of a subgraph that do not convert or have no kernel: {node name: why}."""

    def __init__(self, reasons: dict[str, str]):
        self.reasons = reasons


class _Subgraph:
    """One supported subgraph through the FX frontend, the pass pipeline and the target's
    backend; `module` is what stands in for it in the parent graph."""

    @staticmethod
    def build(sub, call, constants: dict, opts: dict) -> "_Subgraph":
        from llmc.backends.plan import UnsupportedGraph
        from llmc.frontends.fx import from_fx
        from llmc.passes.manager import PassContext, run_passes
        from llmc.passes.pipeline import default_pipeline
        from llmc.tuning import Tuner

        self = _Subgraph()
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        mine = {ph.name: constants[arg.name] for ph, arg in zip(placeholders, call.args)
                if getattr(arg, "name", None) in constants}
        failures: dict[str, str] = {}
        self.graph = from_fx(sub, mine, name=call.target, failures=failures)
        if failures:
            raise _Unsupported(failures)
        self.tensors = [i for i, n in enumerate(placeholders) if n.name not in mine and hasattr(n.meta["val"], "shape")]
        # SymInt arguments that are a plain size symbol are bound from the call's arguments
        self.sizes = [(i, str(n.meta["val"].node.expr)) for i, n in enumerate(placeholders)
                      if n.name not in mine and getattr(getattr(n.meta["val"], "node", None), "expr", None) is not None
                      and n.meta["val"].node.expr.is_Symbol]
        self.returns_tuple = isinstance(next(n for n in sub.graph.nodes if n.op == "output").args[0], (tuple, list))
        self.nodes = sum(1 for n in sub.graph.nodes if n.op == "call_function")
        options = opts["compile"]
        dump = f"{opts['dump_dir']}/{call.target}" if opts["dump_dir"] else None
        self.graph = run_passes(self.graph, default_pipeline(), PassContext(options=options, dump_dir=dump))
        backend = options.backend()
        try:
            # kernels tuned on this machine (`llmc tune`, `llmc compile --tune`) are built as tuned
            self.kernels = backend.build(self.graph, options, Tuner(backend.machine(options)))
        except UnsupportedGraph as e:
            # IR nodes are named after the FX node they came from (passes add suffixes)
            names = {n.name for n in sub.graph.nodes if n.op == "call_function"}
            reasons = {node.split(".")[0]: f"no llmc kernel ({why.removeprefix(node + ': ')})"
                       for node, why in e.reasons.items()}
            raise _Unsupported({name: why for name, why in reasons.items() if name in names}
                               or dict.fromkeys(names, f"no llmc kernel ({e})")) from None
        return self

    def module(self):
        import torch

        from .runner import TorchPlan

        run = TorchPlan(self.graph, self.kernels.loaded, self.kernels.plan, dim_inputs=[sym for _, sym in self.sizes])
        tensors, sizes, returns_tuple = self.tensors, self.sizes, self.returns_tuple

        class Subgraph(torch.nn.Module):
            """Stands in for the fused submodule: the parent graph calls it with the same arguments."""

            def forward(self, *args):
                outs = run(*[args[i] for i in tensors], *[args[i] for i, _ in sizes])
                return outs if returns_tuple else outs[0]

        return Subgraph()
