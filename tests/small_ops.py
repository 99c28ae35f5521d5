"""The small ops of real compiled graphs, node by node: what the TVM and Triton backends' tests of
their small-op kernels share."""

from __future__ import annotations

import numpy as np
from zoo_cases import export

import llmc
from llmc import zoo
from llmc.passes.manager import PassContext, run_passes
from llmc.options import CompileOptions
from llmc.passes.pipeline import default_pipeline

ENV = {"batch": 2, "seq": 3, "past": 4, "total": 7}


def shape(v) -> list[int]:
    """A value's shape at ENV."""
    from llmc.ir.symbolic import evaluate

    return [evaluate(d, ENV) for d in v.shape]


def compiled(name, exporter):
    graph = llmc.from_onnx(export(name, exporter=exporter, kv_cache=True))
    return run_passes(graph, default_pipeline(), PassContext(options=CompileOptions(max_seq_len=128)))


def check_nodes(name, exporter, rng, kernel_of, run) -> int:
    """Each node that `kernel_of(node, readers)` says a small-op kernel runs, fed the reference
    executor's inputs for it at ENV: `run(node, inputs)` returns its outputs, which must be the
    reference's exactly (integers, masks) or within float rounding. Returns the nodes checked."""
    graph = compiled(name, exporter)
    feeds = zoo.get(name).feeds(rng, batch=ENV["batch"], seq=ENV["seq"], past=ENV["past"])
    trace = {}
    llmc.run_reference(graph, feeds, trace=trace)

    def value(v):
        return trace[v] if v in trace else feeds[v.name] if v.kind == "input" else graph.const_value(v)

    readers = graph.consumers()
    checked = 0
    for node in graph.nodes:
        if not kernel_of(node, readers):
            continue
        inputs = [value(v) for pos, v in enumerate(node.inputs)
                  if v is not None and not (node.op in ("reshape", "expand") and pos == 1)]
        for got, v in zip(run(node, inputs), node.outputs):
            want = trace[v]
            if want.dtype.kind == "f":  # masks hold -inf: compared as equal where both are
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=node.name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=node.name)
        checked += 1
    return checked
