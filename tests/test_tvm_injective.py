"""The TVM lowering of the small ops a compiled graph keeps (embedding gather, mask and rotary
table construction), node by node on real compiled graphs: each kernel, fed the reference
executor's inputs for that node, reproduces the reference output exactly (integers, masks) or
within float rounding. And every op of every compiled zoo graph has a TVM kernel or is a view."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from zoo_cases import export

import llmc
from llmc import zoo
from llmc.backends.tvm.injective import LOWERINGS, build, dim_names
from llmc.backends.tvm.target import host
from llmc.passes.manager import PassContext, run_passes
from llmc.passes.pipeline import default_pipeline

FUSED = {"fused_linear", "attention", "rope_cache"}  # backends/tvm/{linear,attention,rope_cache}.py


def _compiled(name, exporter):
    graph = llmc.from_onnx(export(name, exporter=exporter, kv_cache=True))
    return run_passes(graph, default_pipeline(), PassContext(options={"max_seq_len": 128}))


@pytest.mark.parametrize("name,exporter", [("llama-tiny", "dynamo"), ("llama-tiny", "torchscript"),
                                           ("gpt2-tiny", "dynamo"), ("phi-tiny", "torchscript"),
                                           ("gpt-neox-tiny", "dynamo")])
def test_small_ops_match_reference(name, exporter, rng):
    graph = _compiled(name, exporter)
    env = {"batch": 2, "seq": 3, "past": 4, "total": 7}
    feeds = zoo.get(name).feeds(rng, batch=env["batch"], seq=env["seq"], past=env["past"])
    trace = {}
    llmc.run_reference(graph, feeds, trace=trace)

    def value(v):
        return trace[v] if v in trace else feeds[v.name] if v.kind == "input" else graph.const_value(v)

    dev = tvm.cpu(0)
    checked = 0
    for node in graph.nodes:
        if node.op not in LOWERINGS:
            continue
        inputs = [value(v) for pos, v in enumerate(node.inputs)
                  if v is not None and not (node.op in ("reshape", "expand") and pos == 1)]
        wants = [trace[v] for v in node.outputs]
        outs = [tvm.runtime.tensor(np.zeros(w.shape, w.dtype), dev) for w in wants]
        build(node, host())["main"](*[tvm.runtime.tensor(np.array(a, order="C"), dev) for a in inputs], *outs,
                                    *[env[d] for d in dim_names(node)])
        for out, want in zip(outs, wants):
            got = out.numpy()
            if want.dtype.kind == "f":  # masks hold -inf: compared as equal where both are
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=node.name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=node.name)
        checked += 1
    assert checked > 25


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_every_op_has_a_kernel(name):
    ops = {n.op for n in _compiled(name, "dynamo").nodes}
    assert ops <= set(LOWERINGS) | FUSED, ops - set(LOWERINGS) - FUSED
