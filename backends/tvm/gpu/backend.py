"""The TVM backend for GPUs behind `llmc.compile(..., target="opencl")` (Android's Adreno and
Mali; here pocl) and, from the same schedules, Metal (Apple).

Every node becomes a kernel group (`lowering.group_table`): its TensorIR function(s) with a GPU
schedule, lowered to device source and a launch table. The GEMMs (`gpu.linear`: a GEMV for
decode, a tiled GEMM for prefill, in one group), attention (`gpu.attention`, split-K) and the
norms that stand alone (`gpu.norm`) have schedules of their own, with knobs whose values the
manifest records (`kernels.tuning`); rope_cache and the small ops, which compute each output
once, take `lowering.default_schedule`. The artifact holds one source file with every kernel
(`kernels/<kind>/model.<ext>`, each kernel named after its group) and the tables, which the
runtime follows without TVM (`llmc.runtime.gpu`).

The functions' variables that are not run-time dims are bound here, per kernel: a GEMM's rows
(the product of its input's leading dims), a cache's length (the artifact's context), the
keys' length (`total`), a paged cache's block table's width, the small ops' dims that are
expressions (`min(seq, 1)`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from llmc.errors import LlmcError
from llmc.ir.graph import Graph, Node

from ... import Build
from ...knobs import Chooser
from ...plan import Step, UnsupportedGraph, node_key, plan_nodes
from ...cache_layout import attention_args, kv_int8, kv_layout, kv_order, kv_pages, lay_out_caches, rope_cache_args

log = logging.getLogger(__name__)

EXTENSIONS = {"opencl": "cl", "metal": "metal"}


def dim_text(d) -> str:
    """An IR dim (an int or a polynomial over the named dims) as `llmc.runtime.dims` parses it."""
    if isinstance(d, int):
        return str(d)
    terms = [" * ".join([str(c)] + [f"({a})" for a in monomial]) for monomial, c in d.terms.items()]
    return " + ".join(terms) or "0"


def _rows(x) -> str:
    """A GEMM's rows: the product of its input's leading dims."""
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return dim_text(rows)


def plan_node(node: Node, graph: Graph, max_seq: int, kind: str, choose):
    """(kernel key, builder of {name: [(scheduled module, bindings, condition)]}, [step]) for one
    node: the variants of its kernel group (`lowering.group_table`), with the knob values `choose`
    (a `knobs.Chooser`) gives the schedules that have knobs."""
    from .. import attention, injective, rope_cache
    from . import attention as gpu_attention, linear as gpu_linear, lowering, norm as gpu_norm

    def one(make, bindings):  # one variant, always run, with the default schedule
        return lambda name: {name: [(lowering.default_schedule(make().with_attr("global_symbol", name), kind),
                                     bindings, None)]}
    if node.op == "fused_linear":
        spec = gpu_linear.spec_of(node, graph)
        if spec.act_block:
            raise UnsupportedGraph(f"{node.name}: GPU GEMMs take f32 activations", node.name)
        slots = dict(zip(["x", "w", "bias", "residual", "norm_scale", "norm_bias", "w_scale", "w_zero"], node.inputs))
        args = [slots[a].name + (spec.packing(a) or "") for a in spec.arg_names()[:-1]] + [node.outputs[0].name]
        rows = _rows(node.inputs[0])
        key = repr((spec, rows))
        variants = lambda name: {name: gpu_linear.variants(  # noqa: E731
            spec, name, rows, choose(name, key, gpu_linear.knobs(spec)))}
        return key, variants, [Step("", "linear", tuple(args))]
    pages = kv_pages(graph)
    blocks = str(-(-max_seq // pages)) if pages else "0"  # a paged cache's block table's width
    if node.op == "attention":
        spec = replace(attention.AttentionSpec.of(node), kv_int8=kv_int8(graph), order=kv_order(graph),
                       page_tokens=pages)
        key = repr(spec)
        bindings = {"kv_len": "total", "max_seq": str(max_seq), "max_blocks": blocks}
        return key, lambda name: {name: [(lowering.named(gpu_attention.schedule(
            spec, choose(name, key, gpu_attention.knobs(spec))), name), bindings, None)]}, \
            [Step("", "attention", attention_args(node, graph))]
    if node.op == "rope_cache":
        qkv, offset, args = rope_cache_args(node, graph)
        spec = replace(rope_cache.RopeCacheSpec.of(node), row_width=qkv.shape[-1], offset=offset,
                       kv_int8=kv_int8(graph), order=kv_order(graph), page_tokens=pages)
        tables = node.inputs[3]
        bindings = {"b": "batch", "bt": dim_text(tables.shape[0]) if tables is not None else "1", "s": "seq",
                    "m": str(max_seq), "mb": blocks}
        args, _ = rope_cache.args_and_views(node, args)  # device buffers are flat: no views
        return repr(spec), one(lambda: rope_cache.prim_func(spec), bindings), \
            [Step("", "rope_cache", args)]
    if node.op in injective.LOWERINGS:
        args = [v.name for pos, v in enumerate(node.inputs)
                if v is not None and not (node.op in ("reshape", "expand") and pos == 1)]
        dims = injective.Dims()
        bindings = {dims.var(d).name: d for d in injective.dim_names(node)}
        if node.op in gpu_norm.OPS:
            make = lambda name: {name: [(lowering.named(gpu_norm.schedule(  # noqa: E731
                injective.prim_func(node), choose(name, node_key(node), gpu_norm.knobs())), name), bindings, None)]}
        else:
            make = one(lambda: injective.prim_func(node), bindings)
        return node_key(node), make, [Step("", "injective", tuple(args + [v.name for v in node.outputs]))]
    raise UnsupportedGraph(f"{node.name}: no GPU kernel for op {node.op!r}", node.name)


class GpuBackend:
    name = "TVM"
    in_process = False

    def __init__(self, kind: str):
        self.kind = kind  # "opencl" or "metal"

    def resolve(self, options):
        """Defaults: fp32 weights (fp16 halves them), an f32 cache, f32 activations (the only kind)."""
        if options.cpu or options.arch:
            raise LlmcError(f"--{'cpu' if options.cpu else 'arch'}: the {self.kind} target runs on whichever "
                            "GPU the runtime finds; it takes neither --cpu nor --arch")
        if options.dtype not in (None, "fp32", "fp16"):
            raise LlmcError(f"--dtype {options.dtype!r} is not supported on {self.kind}; supported: fp32, fp16")
        if options.activations not in (None, "f32"):
            raise LlmcError(f"--activations {options.activations}: the {self.kind} target's GEMMs take f32 "
                            "activations")
        if options.kv_cache not in (None, "f32", "int8"):
            raise LlmcError(f"KV cache {options.kv_cache!r} is not supported on {self.kind}; supported: f32, int8")
        return replace(options, dtype=options.dtype or "fp32", kv_cache=options.kv_cache or "f32", activations="f32")

    def machine(self, options) -> dict:
        return {"gpu": self.kind}

    def can_measure(self, options) -> str:
        return (f"the {self.kind} target's kernels are not timed here (pocl runs on the CPU): their knobs "
                "(gpu.linear, gpu.attention, gpu.norm) keep their defaults, recorded in the manifest")

    def build(self, graph, options, tuner=None) -> Build:
        from llmc.progress import bar

        from . import lowering
        from ..compile import weights

        caches = lay_out_caches(graph, options.kv_cache, *kv_layout(options.kv_layout))
        max_seq = graph.metadata.get("max_seq_len")
        if not max_seq or not graph.metadata.get("kv_cache", {}).get("entries"):
            raise UnsupportedGraph("the GPU kernels read a runtime-owned KV cache of a known length: compile a "
                                   "decoder with a context length")
        choose = Chooser()  # the knobs' defaults: nothing times these kernels here (`can_measure`)
        functions, plan = plan_nodes(graph, lambda node: plan_node(node, graph, max_seq, self.kind, choose))
        shown = bar(total=len(functions) + 1, desc=f"compiling {self.kind} kernels")
        lowered, tables = [], {}
        for name, variants in functions.items():
            try:
                group = [(lowering.Lowered(mod, self.kind, bindings), condition) for mod, bindings, condition in variants]
            except NotImplementedError as e:
                raise UnsupportedGraph(f"kernel {name}: {e}") from None
            lowered += [low for low, _ in group]
            tables[name] = lowering.group_table(group)
            shown.update()
        source = lowering.source(lowered).encode()
        shown.update()
        shown.close()
        source_path = f"kernels/{self.kind}/model.{EXTENSIONS[self.kind]}"
        kernels = {"source": source_path, "functions": tables, "tuning": choose.configs}
        return Build(target={"kind": self.kind}, cpu=None, kernels=kernels, plan=plan, values=caches,
                     weights=weights(graph, plan), files={source_path: lambda path: Path(path).write_bytes(source)})


OPENCL = GpuBackend("opencl")
METAL = GpuBackend("metal")
