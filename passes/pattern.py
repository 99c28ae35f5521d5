"""Declarative rewrites: patterns that read as the math they match, with a reason for every miss.

A pattern is a small expression tree:

    X = Var("x")
    SILU = Op("mul", X, Op("sigmoid", X))          # x * sigmoid(x)

`Var` binds any value (the same name twice must be the same value), `Const` binds a parameter
(optionally with a given scalar value), `Op` matches a node by op name and attributes.
Intermediate values of a pattern must have a single user (they disappear in the rewrite) unless
marked `shared`. Put structural arguments before constants: a match then fails deep (and is
reported as a near miss) when only the constant is wrong. `add`, `mul`, `max`, `min`, `and`, `or`, `equal` match in either argument order.

A `Rule` pairs a pattern with a builder that emits the replacement. `apply_rules` runs rules
until nothing changes; a match that failed after its root and at least one more op matched is a
near miss, reported with the first constraint that failed and the node it failed at, so
`llmc inspect --passes` can say why something did not fuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmc.ir.graph import Graph, Node, Value

COMMUTATIVE = {"add", "mul", "max", "min", "and", "or", "equal"}


@dataclass(frozen=True)
class Var:
    name: str
    where: Callable[[Value], str | None] | None = None  # a reason when the value does not fit


@dataclass(frozen=True)
class Const:
    name: str
    value: float | None = None  # when given: a scalar (any shape of one element) equal to it
    where: Callable[[np.ndarray], str | None] | None = None


@dataclass(frozen=True)
class Op:
    op: str | tuple[str, ...]
    args: tuple = ()
    attrs: dict = field(default_factory=dict)  # attr -> required value, or predicate
    bind: str | None = None  # name under which the node is bound
    shared: bool = False  # this intermediate value may have other users
    output: int = 0  # which output of a multi-output node the value must be
    rest: bool = False  # the args match a prefix of the inputs; the rest may be anything

    def __init__(self, op, *args, attrs=None, bind=None, shared=False, output=0, rest=False):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "attrs", attrs or {})
        object.__setattr__(self, "bind", bind)
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "rest", rest)

    @property
    def ops(self) -> tuple[str, ...]:
        return (self.op,) if isinstance(self.op, str) else tuple(self.op)


class NoMatch(Exception):
    def __init__(self, reason: str, node: Node | None, depth: int):
        super().__init__(reason)
        self.reason, self.node, self.depth = reason, node, depth


class Match:
    """The bindings of a successful match: values (Var/Const), nodes (Op bind=), data (Const)."""

    def __init__(self, graph: Graph, users: dict[Value, list[Node]]):
        self.graph, self.users = graph, users
        self.outputs = set(graph.outputs)  # graph outputs are readers too
        self.values: dict[str, Value] = {}
        self.nodes: dict[str, Node] = {}
        self.depth = 0

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def data(self, name: str) -> np.ndarray:
        return self.graph.const_value(self.values[name])

    def _snapshot(self):
        return dict(self.values), dict(self.nodes), self.depth

    def _restore(self, snap):
        self.values, self.nodes, self.depth = dict(snap[0]), dict(snap[1]), snap[2]


def match(pattern: Op, value: Value, graph: Graph, users) -> Match:
    m = Match(graph, users)
    _match(pattern, value, m, root=True)
    return m


def _match(pat, value: Value | None, m: Match, root: bool = False) -> None:
    if value is None:
        raise NoMatch("an optional input is absent", None, m.depth)
    if isinstance(pat, Var):
        _bind(pat.name, value, m)
        reason = pat.where(value) if pat.where else None
        if reason:
            raise NoMatch(f"{value.name}: {reason}", value.producer, m.depth)
        return
    if isinstance(pat, Const):
        data = m.graph.const_value(value)
        if data is None:
            raise NoMatch(f"{value.name} is not a constant", value.producer, m.depth)
        if pat.value is not None and not (data.size == 1 and np.isclose(float(data.reshape(-1)[0]), pat.value,
                                                                        rtol=1e-3, atol=1e-6)):
            raise NoMatch(f"{value.name} is not the constant {pat.value:g}", None, m.depth)
        reason = pat.where(data) if pat.where else None
        if reason:
            raise NoMatch(f"{value.name}: {reason}", None, m.depth)
        _bind(pat.name, value, m)
        return
    node = value.producer
    if node is None or node.op not in pat.ops:
        what = f"{node.op} ({node.name})" if node is not None else value.kind
        raise NoMatch(f"{value.name} comes from {what}, not {'/'.join(pat.ops)}", node, m.depth)
    if node.outputs[pat.output] is not value:
        raise NoMatch(f"{value.name} is not output {pat.output} of {node.name}", node, m.depth)
    readers = len(m.users.get(value, ())) + (value in m.outputs)
    if not root and not pat.shared and readers > 1:
        raise NoMatch(f"{value.name} has {readers} readers, the pattern needs it alone", node, m.depth)
    m.depth += 1  # the op matched: a failure from here on is a near miss worth reporting
    for attr, want in pat.attrs.items():
        have = node.attrs.get(attr)
        ok = want(have) if callable(want) else have == want
        if not ok:
            raise NoMatch(f"{node.name} ({node.op}) has {attr}={have}", node, m.depth)
    args = list(node.inputs)
    while args and args[-1] is None and len(args) > len(pat.args):
        args.pop()
    if pat.rest:
        args = args[:len(pat.args)]
    if len(args) != len(pat.args):
        raise NoMatch(f"{node.name} ({node.op}) has {len(args)} inputs, the pattern {len(pat.args)}",
                      node, m.depth)
    if pat.bind:
        m.nodes[pat.bind] = node
    orders = [args]
    if node.op in COMMUTATIVE and len(args) == 2:
        orders.append(args[::-1])
    snap, first_failure = m._snapshot(), None
    for order in orders:
        m._restore(snap)
        try:
            for sub, v in zip(pat.args, order):
                _match(sub, v, m)
            return
        except NoMatch as e:
            if first_failure is None or e.depth > first_failure.depth:
                first_failure = e
    raise first_failure


def _bind(name: str, value: Value, m: Match) -> None:
    bound = m.values.setdefault(name, value)
    if bound is not value:
        raise NoMatch(f"{name} would be both {bound.name} and {value.name}", value.producer, m.depth)


# Rules ----------------------------------------------------------------------------------------
class Builder:
    """Emits the replacement's nodes, named and scoped after the node being replaced."""

    def __init__(self, graph: Graph, root: Node):
        self.graph, self.root = graph, root

    def emit(self, op: str, inputs, **attrs) -> Value:
        (out,) = self.emit_multi(op, inputs, **attrs)
        return out

    def emit_multi(self, op: str, inputs, **attrs) -> list[Value]:
        base = self.root.name.split(".")[0]  # the source node's name, without earlier suffixes
        return self.graph.add_node(op, list(inputs), attrs, name=f"{base}.{op}", scope=self.root.scope)

    def param(self, array: np.ndarray, hint: str) -> Value:
        return self.graph.add_param(hint, np.asarray(array))


@dataclass
class Rule:
    """`build(match, builder)` returns the replacement of the root node's first output, a list
    for each of its outputs, or a dict {old value: new value} when the rewrite also replaces
    values of other matched nodes. `check(match)` may veto a match with a reason."""

    name: str
    pattern: Op
    build: Callable[[Match, Builder], Value | list[Value]]
    check: Callable[[Match], str | None] | None = None
    near_miss_depth: int = 2


@dataclass
class NearMiss:
    rule: str
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.node}: {self.reason}"


def apply_rules(graph: Graph, rules: list[Rule], counts, near_misses: list[NearMiss],
                max_rewrites: int = 100_000) -> int:
    """Rewrite until no rule matches. Counts rewrites per rule in `counts` and records the near
    misses of the final sweep in `near_misses`. Returns the number of rewrites."""
    by_op: dict[str, list[Rule]] = {}
    for rule in rules:
        for op in rule.pattern.ops:
            by_op.setdefault(op, []).append(rule)
    total = 0
    while total < max_rewrites:
        # one sweep in graph order, rewriting as it goes; the nodes a sweep adds are tried by the
        # next, and a sweep without rewrites ends (an earlier root may match after a later rewrite)
        users = graph.consumers()
        misses: dict[tuple[str, str], NearMiss] = {}
        depths: dict[tuple[str, str], int] = {}
        swept = total
        live = set(graph.nodes)
        for node in list(graph.nodes):
            if node not in live:
                continue
            for rule in by_op.get(node.op, ()):
                try:
                    m = match(rule.pattern, node.outputs[0], graph, users)
                    reason = rule.check(m) if rule.check else None
                    if reason:
                        raise NoMatch(reason, node, m.depth)
                except NoMatch as e:
                    key = (rule.name, node.name)
                    if e.depth >= rule.near_miss_depth and e.depth >= depths.get(key, 0):
                        # several variants of one rule: keep the one that got furthest
                        misses[key], depths[key] = NearMiss(rule.name, node.name, e.reason), e.depth
                    continue
                new = rule.build(m, Builder(graph, node))
                if not isinstance(new, dict):
                    new = dict(zip(node.outputs, new if isinstance(new, list) else [new]))
                for old, rep in new.items():
                    if rep is not None:
                        graph.replace_uses(old, rep)
                counts[rule.name] += 1
                total += 1
                graph.remove_dead()
                users, live = graph.consumers(), set(graph.nodes)
                break
            if total >= max_rewrites:
                break
        graph.toposort()
        if total == swept:
            near_misses.extend(misses.values())
            return total
    raise RuntimeError(f"rules did not converge after {max_rewrites} rewrites")
