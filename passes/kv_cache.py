"""KV cache: the export's functional `present = concat(past, new)` becomes `kv_append`, a write
into a cache the runtime owns, and attention reads the cache. The graph records which
input/output pair each cache replaces in `graph.metadata["kv_cache"]`; the cache's physical
layout (axis order, paging, encoding) is the backend's choice (`llmc.backends.cache_layout.lay_out_caches`),
since its kernels read it."""

from __future__ import annotations

from .manager import Pass, PassContext
from .pattern import Op, Rule, Var, apply_rules

def _past(v) -> str | None:
    return None if v.kind == "input" and v.type.rank == 4 else f"{v.name} is not a 4-D graph input"


RULES = [Rule("kv_append", Op("concat", Var("past", where=_past), Var("new"),
                              attrs={"axis": lambda a: a in (2, -2)}),
              lambda m, b: b.emit("kv_append", [m["past"], m["new"]]))]
CACHE_WRITES = ("kv_append", "kv_write")  # kv_write: a static cache (torch.compile's frontend makes it)


def _run(graph, ctx: PassContext):
    apply_rules(graph, RULES, ctx.current.rewrites, ctx.current.near_misses)
    position = {v: i for i, v in enumerate(graph.outputs)}
    appends = sorted((n for n in graph.nodes if n.op in CACHE_WRITES and n.outputs[0] in position
                      and _past(n.inputs[0]) is None),
                     key=lambda n: position[n.outputs[0]])
    entries = [{"past": n.inputs[0].name, "present": n.outputs[0].name} for n in appends]
    if entries:
        graph.metadata["kv_cache"] = {"entries": entries}
    return graph


kv_cache = Pass("kv_cache", _run)
