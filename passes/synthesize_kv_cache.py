"""Give a decoder exported without a KV cache one (option `synthesize_kv_cache`, which the
driver sets for such a file).

Each attention's keys and values (after rotary) are put behind a new past input,
`past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim], through the same
`concat(past, new)` an export with a cache has, and the concatenation becomes the layer's
present output: from there the kv_cache pass and the fusions treat it as any cached export.

Attention then runs over past + seq keys, so the export's own mask ([seq, seq], built for a
prompt with no past) cannot serve: the attention becomes causal, aligned at the end of the keys.
That is exact only when the mask was plain causal for the unpadded prompts the runtimes run, so
the pass first evaluates every attention's mask for a prompt of the artifact's longest context
and refuses anything else (a sliding window shorter than it, bidirectional attention). It also
refuses a graph without a positions input (with a cache, positions must count from the past
length, which a graph that computes them from its own sequence does not do) and one whose mask
input feeds anything besides the attention masks.
"""

from __future__ import annotations

import numpy as np

from llmc.errors import LlmcError
from llmc.frontends.roles import prompt_feeds
from llmc.ir.graph import Graph
from llmc.ir.symbolic import Sym

from .manager import Pass, PassContext

# A mask entry at or below this hides its key (exporters use -inf or the dtype's lowest value).
HIDDEN = -1e4


def _check_causal(graph: Graph, attentions, n: int) -> None:
    from llmc.ir.evaluate import run_reference

    masked = [a for a in attentions if len(a.inputs) > 3 and a.inputs[3] is not None]
    if not masked:
        return
    masks = run_reference(graph, prompt_feeds(graph, np.zeros((1, n))), targets=list({a.inputs[3] for a in masked}))
    causal = np.tril(np.ones((n, n), bool))
    for node in masked:
        mask = masks[node.inputs[3].name]
        if mask.dtype == np.bool_:
            mask = np.where(mask, 0.0, -np.inf)
        full = np.broadcast_to(mask, mask.shape[:-2] + (n, n))
        if not (np.all(full[..., causal] == 0) and np.all(full[..., ~causal] <= HIDDEN)):
            raise LlmcError(f"{node.name}: its mask ({node.inputs[3].name}) is not plain causal over {n} tokens "
                            "(a sliding window or bidirectional attention?); llmc cannot add a KV cache to it")


def _run(graph: Graph, ctx: PassContext) -> Graph:
    if not ctx.synthesize_kv_cache:
        return graph
    roles = graph.metadata.get("roles")
    attentions = [n for n in graph.nodes if n.op == "attention"]
    if not roles or not attentions:
        raise LlmcError("no attention was recognized, so there is no key or value to cache")
    if roles["positions"] is None:
        raise LlmcError("the decoder takes no positions input: it computes them from its own sequence, and with "
                        "a cache they must count from the past length")
    _check_causal(graph, attentions, ctx.options.max_seq_len or 64)
    pairs = []
    for i, node in enumerate(attentions):
        q, k, v = node.inputs[:3]
        if k.type.rank != 4 or k.shape[2] != q.shape[2]:
            raise LlmcError(f"{node.name}: keys {k.type} are not [batch, kv_heads, seq, head_dim] of the queries' length")
        new = {}
        for kind, x in (("key", k), ("value", v)):
            past = graph.add_input(graph.free_name(f"past_key_values.{i}.{kind}"),
                                   x.type.with_shape((x.shape[0], x.shape[1], Sym.var("past"), x.shape[3])))
            (new[kind],) = graph.add_node("concat", [past, x], {"axis": 2}, name=f"{node.name}.cache_{kind}",
                                          scope=node.scope)
            graph.rename(new[kind], graph.free_name(f"present.{i}.{kind}"))
            graph.outputs.append(new[kind])
            pairs.append((past.name, new[kind].name))
        (y,) = graph.add_node("attention", [q, new["key"], new["value"]],
                              {**node.attrs, "is_causal": 1}, name=node.name, scope=node.scope)
        graph.replace_uses(node.outputs[0], y)
        ctx.current.rewrites["cache added"] += 1
    graph.remove_dead()
    graph.toposort()
    graph.metadata["kv_pairs"] = pairs
    mask = roles["mask"]
    if mask and graph.consumers().get(next(v for v in graph.inputs if v.name == mask)):
        raise LlmcError(f"the attention mask {mask!r} feeds more than the attention masks (the positions?); "
                        "with a cache it would be read at the wrong length")
    return graph


synthesize_kv_cache = Pass("synthesize_kv_cache", _run)
