"""Dead-code elimination: nodes no output depends on, and unused parameters, go."""

from __future__ import annotations

from .manager import Pass


def _dce(graph, ctx):
    ctx.current.rewrites["removed"] += graph.remove_dead()
    return graph


dce = Pass("dce", _dce)
