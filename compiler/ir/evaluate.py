"""Run an IR graph with the numpy reference implementations of its ops.

This is the meaning of a graph: passes are checked by comparing its outputs before and after,
and backends by comparing against it. With `check_types`, every value computed is also checked
against its inferred type (dtype, and shape with the symbolic dims bound from the feeds), which
tests shape inference on real data.
"""

from __future__ import annotations

import numpy as np

from llmc.errors import LlmcError
from llmc.ir.dtypes import DType
from llmc.ir.graph import Graph, Value
from llmc.ir.symbolic import Sym
from llmc.ops import get_op


class FeedError(LlmcError):
    """Inputs that do not fit the graph's inputs (names, dtypes, shapes)."""


def run_reference(graph: Graph, feeds: dict[str, np.ndarray], *, check_types: bool = False,
                  trace: dict | None = None, targets: list[Value] | None = None) -> dict[str, np.ndarray]:
    """Outputs of `graph` for `feeds` (numpy arrays keyed by input name), keyed by output name,
    in the graph's output order. With `trace`, every value computed is also stored there (keyed
    by Value), for testing backends op by op. With `targets`, only what those values need is
    computed, and they are returned instead (a pass evaluating a mask computes just the mask)."""
    env: dict[str, int] = {}
    values: dict[Value, np.ndarray] = {}
    for v in graph.inputs:
        values[v] = _check_feed(v, feeds, env)
    extra = set(feeds) - {v.name for v in graph.inputs}
    if extra:
        raise FeedError(f"unknown input(s) {sorted(extra)}; the graph takes "
                        f"{[v.name for v in graph.inputs]}")

    last_use = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None:
                last_use[v] = i
    keep = set(targets or graph.outputs)
    needed = _ancestors(graph, keep) if targets else None

    for i, node in enumerate(graph.nodes):
        if needed is not None and node not in needed:
            continue
        args = [None if v is None else values[v] if v in values else graph.const_value(v)
                for v in node.inputs]
        result = get_op(node.op).ref(*args, **_concrete(node.attrs, env))
        results = result if isinstance(result, tuple) else (result,)
        for v, arr in zip(node.outputs, results):
            arr = np.asarray(arr)
            if check_types:
                _check_value(node, v, arr, env)
            values[v] = arr
            if trace is not None:
                trace[v] = arr
        for v in node.inputs:
            if v is not None and last_use.get(v) == i and v not in keep and v.kind == "node":
                values.pop(v, None)
    return {v.name: values[v] if v in values else graph.const_value(v) for v in targets or graph.outputs}


def _ancestors(graph: Graph, values) -> set:
    """The nodes that `values` depend on."""
    out, todo = set(), [v.producer for v in values if v.producer is not None]
    while todo:
        node = todo.pop()
        if node not in out:
            out.add(node)
            todo += [v.producer for v in node.inputs if v is not None and v.producer is not None]
    return out


def _concrete(attrs: dict, env: dict[str, int]) -> dict:
    """Attributes with symbolic dims (the `dims` op's values) evaluated for this run."""
    out = attrs
    for k, v in attrs.items():
        if isinstance(v, tuple) and any(isinstance(d, Sym) for d in v):
            out = dict(out) if out is attrs else out
            out[k] = tuple(d.evaluate(env) if isinstance(d, Sym) else d for d in v)
    return out


def _check_feed(v: Value, feeds: dict[str, np.ndarray], env: dict[str, int]) -> np.ndarray:
    if v.name not in feeds:
        raise FeedError(f"missing input {v.name!r} ({v.type})")
    arr = np.asarray(feeds[v.name])
    if arr.dtype != v.dtype.numpy():
        raise FeedError(f"input {v.name!r}: expected {v.dtype}, got numpy {arr.dtype}")
    if arr.ndim != v.type.rank:
        raise FeedError(f"input {v.name!r}: expected rank {v.type.rank} ({v.type}), "
                        f"got shape {arr.shape}")
    for d, n in zip(v.shape, arr.shape):
        if not _bind(d, n, env):
            raise FeedError(f"input {v.name!r}: shape {arr.shape} does not fit {v.type} "
                            f"(dim {d} is {n}, but {_known(d, env)} elsewhere)")
    return arr


def _known(d, env):
    try:
        return d if isinstance(d, int) else d.evaluate(env)
    except KeyError:
        return "unknown"


def _bind(d, n: int, env: dict[str, int]) -> bool:
    """Check dim `d` against the actual size `n`, binding a single unbound symbol."""
    if isinstance(d, int):
        return d == n
    unbound = d.atoms - set(env)
    if not unbound:
        return d.evaluate(env) == n
    if len(d.terms) == 1 and d == Sym.var(next(iter(unbound))):
        env[next(iter(unbound))] = n
        return True
    return True  # a compound expression with unknown parts: nothing to check yet


def _check_value(node, v: Value, arr: np.ndarray, env: dict[str, int]) -> None:
    where = f"node {node.name!r} ({node.op}) output {v.name!r}"
    if v.dtype is not DType.i4 and arr.dtype != v.dtype.numpy():
        raise AssertionError(f"{where}: inferred {v.dtype}, computed {arr.dtype}")
    if arr.ndim != v.type.rank or not all(_bind(d, n, env) for d, n in zip(v.shape, arr.shape)):
        raise AssertionError(f"{where}: inferred {v.type}, computed shape {arr.shape}")
