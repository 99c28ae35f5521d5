"""A passed graph as Triton kernel launches: one kernel family per fused op (`kernels/`), the
small ops generated (`injective.py`), each kernel described by what compiling and launching it
needs (`TritonKernel`), and the plan of calls.

Every kernel takes its buffers, then D (device memory holding [past, total]), batch and seq; the
grid is a function of the dims, evaluated by the runtime (`llmc.runtime.launch`). At decode the
grid depends on batch and seq alone, except for kernels over the context (the mask, attention's
key slices), whose grids the CUDA executor sizes for the longest context when it captures the
step: their programs past the current length do nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llmc.ir.graph import Graph, Node
from llmc.ir.symbolic import Sym
from llmc.ops.transformer import QK_NORMS

from ..knobs import Chooser, Knob
from ..plan import Step, UnsupportedGraph, encode_dim, node_key
from ..cache_layout import attention_args, kv_int8, kv_order, kv_pages, rope_cache_args
from ..packing import NIBBLES
from . import injective
from .kernels import linear

DIMS = ("past", "total", "batch", "seq")  # the scalars every step passes (past, total via D)
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int64": "*i64", "int32": "*i32",
           "int8": "*i8", "uint8": "*u8", "bool": "*i1"}
DECODE_ROWS = 4  # GEMMs of up to this many rows run the GEMV kernel
ACTIVATIONS = {"": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4}


@dataclass
class TritonKernel:
    """One compiled Triton function: its source module, name, compile-time constants, the
    types of its run-time arguments (buffers, then D, batch, seq), its grid (three dims, each
    a product of cdiv(dim polynomial, block) factors), warps and stages, and, for GEMMs, the
    kernel to launch instead when the rows are few (`decode`: {"kernel", "max_rows", "rows"})."""

    module: str
    function: str
    constexprs: dict
    signature: list[str]
    grid: list[list[list]]
    num_warps: int = 4
    num_stages: int = 2
    decode: dict | None = None
    source: str = field(default="", repr=False)  # a generated module's text (kernels/ has the others)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["source"]
        return out


def _poly(*factors) -> Sym | int:
    out = 1
    for f in factors:
        out = out * f
    return out


def _cdiv(d, block: int) -> list:
    return [encode_dim(d), block]


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _rows(x, where: str, fixed_batch: bool) -> tuple:
    """The rows of a GEMM or norm input: the product of its leading dims, which the kernels
    compute as batch * seq * mul (seq_rows) or batch * mul. In a graph that fixes a batch of 1
    (a static-batch export; the runtime runs it one sequence at a time) seq * mul and mul are
    those rows with batch 1."""
    rows = _poly(*x.shape[:-1])
    sym = rows if isinstance(rows, Sym) else None
    terms = sym.terms if sym is not None else {(): rows}
    if len(terms) == 1:
        (monomial, mul), = terms.items()
        seq_rows = {("batch", "seq")} | ({("seq",)} if fixed_batch else set())
        batch_rows = {("batch",)} | ({()} if fixed_batch else set())
        if monomial in seq_rows | batch_rows:
            return rows, monomial in seq_rows, mul
    raise UnsupportedGraph(f"{where}: rows {rows} are not a multiple of batch * seq or batch")


class Planner:
    """Kernel specs and steps for the nodes of one graph."""

    def __init__(self, graph: Graph, dtypes: dict[str, str], dot_f16: bool, choose=None):
        self.graph, self.dtypes, self.dot_f16 = graph, dtypes, dot_f16
        self.choose = choose or Chooser()  # each GEMM's configuration (`kernels.linear.knobs`)
        self.seq_major = int(kv_order(graph) == "bshd")  # the caches' axis order (`cache_layout.lay_out_caches`)
        self.page = kv_pages(graph)  # tokens per block of a paged cache; 0: contiguous
        tokens = graph.metadata.get("roles", {}).get("tokens")
        # a static-batch export's token ids are [1, seq] (`_rows`)
        self.fixed_batch = any(v.name == tokens and v.shape[0] == 1 for v in graph.inputs)
        self.scratch: dict[str, tuple[str, list]] = {}  # values the plan adds: {name: (dtype, IR shape)}

    def dtype(self, name: str) -> str:
        if not name:
            return "float32"
        return self.scratch[name][0] if name in self.scratch else self.dtypes[name]

    def max_seq(self, node: Node) -> int:
        """The caches' length: the artifact's context (the runtime allocates them so)."""
        if not self.graph.metadata.get("kv_cache", {}).get("entries") or not self.graph.metadata.get("max_seq_len"):
            raise UnsupportedGraph(f"{node.name}: the Triton kernels read a runtime-owned KV cache of a known "
                                   "length: compile a decoder with a context length", node.name)
        return self.graph.metadata["max_seq_len"]

    def paging(self, node: Node) -> dict:
        """The cache kernels' paging constants: tokens per block, and the block table's width."""
        return dict(PAGE=self.page, MAX_BLOCKS=-(-self.max_seq(node) // self.page) if self.page else 1)

    def signature(self, args) -> list[str]:
        return [POINTER[self.dtype(a)] for a in args] + ["*i32", "i32", "i32"]

    def __call__(self, node: Node):
        if node.op == "fused_linear":
            return self.linear(node)
        if node.op == "attention":
            return self.attention(node)
        if node.op == "rope_cache":
            return self.rope_cache(node)
        if node.op in ("add_norm", "norm_add", "rms_norm", "layer_norm"):
            return self.norm(node)
        if node.op in injective.LOWERINGS:
            return self.injective(node)
        raise UnsupportedGraph(f"{node.name}: no Triton kernel for op {node.op!r}", node.name)

    def linear(self, node: Node):
        x = node.inputs[0]
        slots = (list(node.inputs) + [None] * 8)[:8]
        quant = node.attrs["quant"]
        names = [v.name if v is not None else "" for v in slots]
        if quant == "w4":
            names[1] += NIBBLES
        args = (*names, node.outputs[0].name)
        n, k = node.inputs[1].shape
        gated = bool(node.attrs["gated"])
        out_n = n // 2 if gated else n
        rows, seq_rows, mul = _rows(x, node.name, self.fixed_batch)
        group = node.attrs["group_size"] or 0
        block_k = min(pow2(k), 256 if not quant == "w4" else min(256, group))
        common = dict(K=k, N=out_n, NORM={"": 0, "rms": 1, "layer": 2}[node.attrs["norm"]],
                      EPS=float(node.attrs["epsilon"]), ACT=ACTIVATIONS[node.attrs["activation"]], GATED=int(gated),
                      HAS_BIAS=int(slots[2] is not None), HAS_RES=int(slots[3] is not None),
                      QUANT={"": 0, "w8": 8, "w4": 4}[quant], GROUP=max(group, 1), DOT_F16=int(self.dot_f16),
                      SEQ_ROWS=int(seq_rows), ROWS_MUL=mul)
        signature = self.signature(args)
        key = repr(("linear", common))

        def make(name):
            c = self.choose(name, key, [Knob(*k) for k in linear.knobs(out_n)])
            gemv = TritonKernel("linear", "gemv", dict(common, BLOCK_N=c["gemv_block_n"], BLOCK_K=max(block_k, 16)),
                                signature, [[_cdiv(out_n, c["gemv_block_n"])], [_cdiv(rows, 1)], []],
                                num_warps=c["gemv_warps"], num_stages=2)
            bm, bn = (int(v) for v in c["gemm_tile"].split("x"))
            gemm = TritonKernel("linear", "gemm", dict(common, BLOCK_M=bm, BLOCK_N=bn,
                                                       BLOCK_K=max(min(block_k, 32), 16), GROUP_M=8),
                                signature, [[_cdiv(rows, bm), _cdiv(out_n, bn)], [], []],
                                num_warps=c["gemm_warps"], num_stages=c["gemm_stages"])
            gemm.decode = {"kernel": name + "_gemv", "max_rows": DECODE_ROWS, "rows": encode_dim(rows)}
            return {name: gemm, name + "_gemv": gemv}
        return key, make, [Step("", "linear", args, DIMS)]

    def attention(self, node: Node):
        q, k = node.inputs[:2]
        heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[3]
        masked = len(node.inputs) > 3 and node.inputs[3] is not None
        args = list(attention_args(node, self.graph))
        int8 = kv_int8(self.graph)
        if not int8:  # the kernels take scales always; without them, any buffer
            args[3:3] = ["", ""]
        if not masked:
            args[5:5] = [""]
        if not self.page:  # nor the block tables and lengths
            args[6:6] = ["", ""]
        max_seq = self.max_seq(node)
        splits = min(16, pow2(max_seq // 512 + 1))  # key slices at decode, from the context the artifact serves
        bd = max(16, pow2(d))
        scale = node.attrs["scale"]
        scale = float(scale) if scale is not None else d ** -0.5
        consts = dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, MAX_SEQ=max_seq,
                      SCALE=scale, MASKED=int(masked), CAUSAL=int(bool(node.attrs["is_causal"])), KV_INT8=int(int8),
                      MERGE_HEADS=int(bool(node.attrs["merge_heads"])), SPLITS=splits, DOT_F16=int(self.dot_f16),
                      BLOCK_M=16, BLOCK_N=64 if d <= 128 else 32, BD=bd, SEQ_MAJOR=self.seq_major,
                      **self.paging(node), SOFTCAP=float(node.attrs["softcap"]))
        seq, batch = q.shape[2], q.shape[0]
        partial = node.outputs[0].name + ".partial"
        args.append(partial)
        self.scratch[partial] = ("float32", [_poly(batch, seq, heads * splits * (bd + 1))])
        sig = self.signature(args)
        grid = [[_cdiv(seq, 16)], [_cdiv(_poly(batch, heads), 1)], [[1, 1]] if splits == 1 else [[splits, 1]]]
        kernels = {"": TritonKernel("attention", "partial", consts, sig, grid, num_warps=4, num_stages=2)}
        steps = [Step("", "attention", tuple(args), DIMS)]
        if splits > 1:
            kernels["_merge"] = TritonKernel("attention", "merge", consts, sig, grid[:2] + [[]], num_warps=4)
            steps.append(Step("_merge", "attention", tuple(args), DIMS))
        return repr(("attention", consts)), lambda name: {name + s: k for s, k in kernels.items()}, steps

    def rope_cache(self, node: Node):
        qkv, offset, args = rope_cache_args(node, self.graph)
        args = list(args)
        if not kv_int8(self.graph):
            args[7:7] = ["", ""]
        if not self.page:
            args[9:9] = ["", ""]
        q = node.outputs[0]
        heads, kv_heads, d = node.attrs["heads"], node.attrs["kv_heads"], q.shape[3]
        rotary = node.inputs[3] is not None
        rd = (node.attrs["rotary_dim"] or d) if rotary else 0
        consts = dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=d, ROTARY=rd, ROW=qkv.shape[-1], OFFSET=offset,
                      MAX_SEQ=self.max_seq(node), KV_INT8=int(kv_int8(self.graph)), BD=pow2(d),
                      SEQ_MAJOR=self.seq_major, **self.paging(node),
                      QK_NORM=QK_NORMS.index(node.attrs["qk_norm"]), EPS=float(node.attrs["norm_epsilon"]),
                      BW=min(1024, pow2(heads * d)))
        batch, seq = q.shape[0], q.shape[2]
        grid = [[_cdiv(_poly(batch, seq), 1)], [[heads + 2 * kv_heads, 1]], []]
        kernel = TritonKernel("rope_cache", "rope_cache", consts, self.signature(args), grid, num_warps=1)
        return repr(("rope_cache", consts, self.signature(args))), lambda name: {name: kernel}, \
            [Step("", "rope_cache", tuple(args), DIMS)]

    def norm(self, node: Node):
        add, post = node.op == "add_norm", node.op == "norm_add"
        inputs = list(node.inputs) + [None] * 4
        a, b, scale, bias = inputs[:4] if add else (inputs[1], inputs[0], *inputs[2:4]) if post else \
            (inputs[0], None, *inputs[1:3])
        if add and a.shape != b.shape:
            raise UnsupportedGraph(f"{node.name}: add_norm of {a.type} and {b.type}: the kernel adds equal shapes",
                                   node.name)
        outs = [v.name for v in node.outputs]
        args = (a.name, b.name if b is not None else "", scale.name, bias.name if bias is not None else "",
                outs[0] if add else "", outs[-1])
        n = a.shape[-1]
        rows, seq_rows, mul = _rows(a, node.name, self.fixed_batch)
        layer = node.op == "layer_norm" or node.attrs.get("norm") == "layer"
        consts = dict(N=n, ADD=int(add), LAYER=int(layer), HAS_BIAS=int(bias is not None),
                      EPS=float(node.attrs["epsilon"]), BLOCK=pow2(n), SEQ_ROWS=int(seq_rows), ROWS_MUL=mul,
                      RESIDUAL=int(post))
        kernel = TritonKernel("norm", "norm", consts, self.signature(args), [[_cdiv(rows, 1)], [], []], num_warps=4)
        return repr(("norm", consts, kernel.signature)), lambda name: {name: kernel}, \
            [Step("", "norm", args, DIMS)]

    def argmax(self) -> TritonKernel:
        """Greedy decoding's argmax over the logits of each sequence's last position."""
        logits = next(v for v in self.graph.outputs if v.name == self.graph.metadata["roles"]["logits"])
        return TritonKernel("sample", "argmax", {"VOCAB": logits.shape[-1], "BLOCK": 1024},
                            ["*fp32", "*i32", "*i32", "i32", "i32"], [[_cdiv(logits.shape[0], 1)], [], []], num_warps=4)

    def injective(self, node: Node):
        args = [v.name for pos, v in enumerate(node.inputs) if v is not None and not injective._shape_only(node, pos)]
        args += [v.name for v in node.outputs]

        def make(name):
            src = injective.source(node, name)
            grid = [[_cdiv(_poly(*injective.grid_shape(node)), injective.BLOCK)], [], []]
            return {name: TritonKernel(name, name, {"BLOCK": injective.BLOCK}, self.signature(args), grid,
                                       num_warps=4, source=src)}
        return node_key(node), make, [Step("", "injective", tuple(args), DIMS)]


def value_dtypes(graph: Graph, caches: dict) -> dict[str, str]:
    """Each value's element type as the kernels see it: the graph's, the caches' (pasts and
    presents are one buffer) as laid out."""
    out = {v.name: v.dtype.numpy().name for v in graph.values()}
    out.update({name: dtype for name, (dtype, _) in caches.items()})
    out.update({e["present"]: caches[e["past"]][0] for e in graph.metadata["kv_cache"]["entries"]})
    out.update({name + NIBBLES: "uint8" for name in list(out)})
    return out
