"""The KV cache as plan values: its encodings, axis orders and paging (`--kv-layout`), the
descriptor a backend records in `graph.metadata["kv_cache"]`, the indexing every kernel that
reads or writes a cache follows, and the arguments of the steps that do (rope_cache, attention). The runtime allocates the caches as laid out here."""

from __future__ import annotations

from llmc.ir.graph import Graph, Node
from llmc.ir.symbolic import Sym
from llmc.runtime.schema import KV_BLOCKS, KV_LENGTHS  # the runtime's to give

from .plan import UnsupportedGraph

SCALE = ".scale"  # an int8 cache's scales (a head's row of d values has one): a cache of its own
CACHE_DTYPES = {"f32": None, "f16": "float16", "int8": "int8"}  # None: the graph's own
# the KV cache's axis orders: where the graph's [batch, kv_heads, seq, head_dim] axes go
KV_ORDERS = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3)}
KV_ALIGNMENT = 64  # bytes: every cache buffer starts on a cache line (both runtimes' allocators)
MAX_PAGE_TOKENS = 4096


def kv_int8(graph: Graph) -> bool:
    """Whether the KV cache is int8 (`graph.metadata["kv_cache"]["dtype"]`, set by the driver)."""
    return graph.metadata.get("kv_cache", {}).get("dtype") == "int8"


def check_kv_layout(layout: str) -> None:
    from llmc.errors import LlmcError

    if layout in ("auto", *KV_ORDERS):
        return
    pages = layout.removeprefix("paged:") if isinstance(layout, str) and layout.startswith("paged:") else None
    if pages is None:
        raise LlmcError(f"--kv-layout {layout}: not a KV-cache layout; supported: auto, {', '.join(KV_ORDERS)}, "
                        "paged:N (blocks of N tokens)")
    if not pages.isdigit() or not 1 <= int(pages) <= MAX_PAGE_TOKENS:
        raise LlmcError(f"--kv-layout {layout}: N, the tokens of a block, must be an integer from 1 to "
                        f"{MAX_PAGE_TOKENS}")


def kv_layout(layout: str) -> tuple[str, int]:
    """The KV cache's (axis order, tokens per block; 0: one contiguous buffer per layer and
    sequence): as asked (`--kv-layout`), or by the cost model: contiguous "bhsd" on every target.
    Attention's parallel work is per (batch, head) (a TVM task, a Triton program's key blocks),
    and in bhsd each reads one contiguous block of its head's keys and values; in bshd the same
    rows lie a row of all heads apart. What bshd does better, writing a token's heads as one row,
    is a few hundred bytes per layer and step. Paging is a memory choice, not a speed one (an
    indirection per key position): a runtime serving sequences of different lengths asks for it;
    its blocks are bhsd ([block, kv_heads, N, head_dim])."""
    if layout.startswith("paged:"):
        return "bhsd", int(layout.removeprefix("paged:"))
    return "bhsd" if layout == "auto" else layout, 0


def kv_shape(order: str, batch, kv_heads, max_seq, head_dim=None) -> tuple:
    """A cache's shape in `order` (head_dim None: its int8 scales', one per head and token)."""
    shape = (batch, kv_heads, max_seq) if order == "bhsd" else (batch, max_seq, kv_heads)
    return shape if head_dim is None else (*shape, head_dim)


def kv_index(order: str, b, h, pos, *d) -> list:
    """The indices of (batch, kv head, position[, feature]) in a cache of `order`: how a kernel
    addresses the cache the descriptor describes. In a paged cache, b and pos are the block and
    the position in it (`kv_slot`)."""
    return [b, h, pos, *d] if order == "bhsd" else [b, pos, h, *d]


def kv_slot(page_tokens: int, blocks, b, pos) -> tuple:
    """Where sequence b's position pos is kept, as (cache row, position in it): (b, pos) in a
    contiguous cache; in a paged one, the block the sequence's block table `blocks` [batch,
    max_blocks] gives (a loaded int32, widened to the kernels' int64 indices) and the offset in it."""
    if not page_tokens:
        return b, pos
    return blocks[b, pos // page_tokens].astype("int64"), pos % page_tokens


def kv_order(graph: Graph) -> str:
    """The KV cache's axis order (`lay_out_caches`); "bhsd" before a backend chose one."""
    return graph.metadata.get("kv_cache", {}).get("layout", {}).get("order", "bhsd")


def _check_every_past_is_cached(graph: Graph) -> None:
    """An imported decoder's past inputs must all be caches the runtime owns: one the cache pass
    could not take would be fed empty at every step (wrong tokens, silently)."""
    if "roles" not in graph.metadata:  # torch.compile: the caller feeds every input
        return
    cached = {e["past"] for e in graph.metadata.get("kv_cache", {}).get("entries", [])}
    for v in graph.inputs:
        if v.type.rank == 4 and v.shape[2] == Sym.var("past") and v.name not in cached:
            raise UnsupportedGraph(f"{v.name}: the layer's cache is not written whole to a graph output (a sliding "
                                   "window shorter than the context keeps only its last positions?); compile with "
                                   "a context the window covers (--max-seq-len)", v.name)


def lay_out_caches(graph: Graph, dtype: str, order: str = "bhsd", page_tokens: int = 0) -> dict:
    """Record the KV cache's layout in `graph.metadata["kv_cache"]`: its encoding ("f32", "f16"
    or "int8") and its descriptor (`layout`: the axis order, KV_ORDERS; `page_tokens`, 0 for one
    contiguous buffer per layer and kind; `alignment` in bytes). Returns the runtime's caches as
    plan values, {name: (dtype, shape)}: the graph's past [batch, kv_heads, past, head_dim] in
    the order's axes, sized by the runtime at the artifact's context. With int8 the keys and values
    are int8, and their scales (the same axes without head_dim) are caches too, with past/present
    pairs of their own. The kernels index the caches by the same descriptor.

    Paged (`page_tokens` N > 0), each cache is a pool of `blocks` blocks of N positions,
    [blocks, kv_heads, N, head_dim] in the order's axes, whose size the runtime chooses and may
    grow; two more values are the runtime's to give at every step: KV_BLOCKS, int32 [batch,
    max_blocks], each sequence's blocks in position order, and KV_LENGTHS, int32 [batch], the
    positions each sequence already holds (its own `past`: sequences of a batch may differ)."""
    _check_every_past_is_cached(graph)
    cache = graph.metadata.get("kv_cache")
    if cache is None:  # a graph from torch.compile: its caller owns the caches, if any
        return {}
    cache["dtype"] = dtype
    cache["layout"] = {"order": order, "page_tokens": page_tokens, "alignment": KV_ALIGNMENT}
    axes = KV_ORDERS[order]
    by_name = {v.name: v for v in graph.values()}
    out, scales = {}, []
    for e in cache["entries"]:
        past = by_name[e["past"]]
        rows = [Sym.var("blocks"), past.shape[1], page_tokens, past.shape[3]] if page_tokens else past.shape
        shape = [rows[a] for a in axes]
        out[e["past"]] = (CACHE_DTYPES[dtype] or past.dtype.numpy().name, shape)
        if dtype == "int8":
            out[e["past"] + SCALE] = (past.dtype.numpy().name, shape[:-1])
            scales.append({"past": e["past"] + SCALE, "present": e["present"] + SCALE})
    cache["entries"] += scales
    if page_tokens:
        if not cache["entries"]:
            raise UnsupportedGraph("a paged KV cache needs a graph with past_key_values")
        batch = by_name[cache["entries"][0]["past"]].shape[0]
        max_blocks = -(-graph.metadata["max_seq_len"] // page_tokens)
        out[KV_BLOCKS] = ("int32", [batch, max_blocks])
        out[KV_LENGTHS] = ("int32", [batch])
    return out


def kv_pages(graph: Graph) -> int:
    """Tokens per block of a paged KV cache (`lay_out_caches`); 0 for contiguous caches."""
    return graph.metadata.get("kv_cache", {}).get("layout", {}).get("page_tokens", 0)


def rope_qkv(node: Node):
    """The merged projection a rope_cache reads and where q starts in its rows: q, k, v must be
    consecutive parts of one split along the last axis."""
    q, k, v = node.inputs[:3]
    split = q.producer
    parts = split.outputs if split is not None and split.op == "split" else []
    if [k.producer, v.producer] != [split, split] or q not in parts or \
            parts[parts.index(q):parts.index(q) + 3] != [q, k, v] or split.attrs["axis"] not in (-1, 2):
        raise UnsupportedGraph(f"{node.name}: q, k, v are not consecutive parts of one split of a projection",
                               node.name)
    offset = sum(p.shape[-1] for p in parts[:parts.index(q)])
    return split.inputs[0], offset


def rope_cache_args(node: Node, graph: Graph):
    """(merged projection, q's column in it, the step's args) of a rope_cache: the projection,
    the rotary tables ("" without rotation), the q/k norms' weights ("" without), the caches
    (without a past, the node's own outputs, written from position 0), an int8 cache's scales,
    and q out."""
    qkv, offset = rope_qkv(node)
    cos, sin, past_k, past_v = node.inputs[3:7]
    norms = [w.name if w is not None else "" for w in (list(node.inputs[8:10]) + [None, None])[:2]]
    caches = [past_k.name, past_v.name] if past_k is not None else [v.name for v in node.outputs[1:]]
    int8 = kv_int8(graph)
    if past_k is None and (int8 or kv_pages(graph)):
        raise UnsupportedGraph(f"{node.name}: an int8 or paged KV cache needs a graph with past_key_values", node.name)
    tables = [cos.name, sin.name] if cos is not None else ["", ""]
    scales = [c + SCALE for c in caches] * int8
    return qkv, offset, (qkv.name, *tables, *norms, *caches, *scales, *_paging(graph), node.outputs[0].name)


def attention_args(node: Node, graph: Graph) -> tuple[str, ...]:
    """q, the caches, an int8 cache's scales, the mask (when there is one), a paged cache's block
    tables and lengths, the output."""
    q, k, v, *mask = [v.name for v in node.inputs if v is not None]
    int8 = kv_int8(graph)
    return (q, k, v, *[k + SCALE, v + SCALE] * int8, *mask, *_paging(graph), node.outputs[0].name)


def _paging(graph: Graph) -> tuple[str, ...]:
    """A paged cache's run-time inputs, as the cache kernels take them (none when contiguous)."""
    return (KV_BLOCKS, KV_LENGTHS) if kv_pages(graph) else ()
