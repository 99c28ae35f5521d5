"""The pass manager: named passes run in order over one graph, each reporting what it did.

A pass is a function `(graph, ctx) -> graph`. `run_passes` records per pass the rewrites it
made (counted per rule), the near misses of its patterns, and the op counts before and after;
in debug mode it verifies the graph after every pass, and with `dump_dir` it writes the IR after
every pass (`03-recognize_norms.txt`, ...).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmc.ir.graph import Graph
from llmc.ir.verify import verify
from llmc.options import CompileOptions

from .pattern import NearMiss, Rule, apply_rules

log = logging.getLogger(__name__)


@dataclass
class PassReport:
    name: str
    rewrites: collections.Counter = field(default_factory=collections.Counter)
    near_misses: list[NearMiss] = field(default_factory=list)
    ops_before: collections.Counter = field(default_factory=collections.Counter)
    ops_after: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def summary(self) -> str:
        before, after = sum(self.ops_before.values()), sum(self.ops_after.values())
        done = ", ".join(f"{k} x{v}" for k, v in self.rewrites.most_common()) or "nothing"
        return f"{self.name}: {done}; nodes {before} -> {after} ({self.seconds * 1e3:.0f} ms)"


@dataclass
class PassContext:
    """What passes may consult and where they report. `options`: the compile's, resolved (a
    target reaches the passes through them, e.g. int8 activations on a CPU, fp16 weights on a
    GPU); `synthesize_kv_cache`: the graph is a decoder exported without a cache, to be given one."""

    options: CompileOptions = field(default_factory=lambda: CompileOptions(max_seq_len=None))
    synthesize_kv_cache: bool = False
    debug: bool = False
    dump_dir: Path | None = None
    reports: list[PassReport] = field(default_factory=list)
    current: PassReport | None = None


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph, PassContext], Graph]

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        return self.run(graph, ctx)


def rule_pass(name: str, rules: list[Rule]) -> Pass:
    """A pass that applies pattern rules until none matches."""

    def run(graph: Graph, ctx: PassContext) -> Graph:
        apply_rules(graph, rules, ctx.current.rewrites, ctx.current.near_misses)
        return graph

    return Pass(name, run)


def run_passes(graph: Graph, passes: list[Pass], ctx: PassContext | None = None) -> Graph:
    ctx = ctx or PassContext()
    if ctx.dump_dir:
        Path(ctx.dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(ctx.dump_dir) / "00-input.txt").write_text(str(graph) + "\n")
    from llmc.progress import bar

    steps = bar(passes, desc="passes")
    for i, p in enumerate(steps, start=1):
        steps.set_description(f"pass {p.name}")
        report = PassReport(p.name, ops_before=collections.Counter(n.op for n in graph.nodes))
        ctx.current = report
        start = time.perf_counter()
        graph = p(graph, ctx)
        graph.store.release_pages()  # what the pass read of the model file need not stay resident
        report.seconds = time.perf_counter() - start
        report.ops_after = collections.Counter(n.op for n in graph.nodes)
        ctx.reports.append(report)
        log.info("%s", report.summary())
        if ctx.debug:
            verify(graph)
        if ctx.dump_dir:
            (Path(ctx.dump_dir) / f"{i:02d}-{p.name}.txt").write_text(str(graph) + "\n")
    steps.close()
    ctx.current = None
    return graph
