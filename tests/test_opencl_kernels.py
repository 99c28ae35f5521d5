"""GPU schedules, proven through OpenCL on pocl (Debian's pocl-opencl-icd: an OpenCL driver for
this CPU): each kernel built for the opencl target (`backends/tvm/gpu.py`), its source built by
the driver and launched from its launch table by the runtime's `opencl.KernelGroup`, against
the op's reference. pocl's speed says nothing about a GPU's; these tests are about results."""

from __future__ import annotations

import numpy as np
import pytest
from small_ops import ENV, check_nodes, shape

from llmc.backends.tvm import gpu
from llmc.backends.tvm.injective import LOWERINGS, prim_func
from llmc.runtime import opencl


@pytest.fixture(scope="module")
def queue():
    cl = opencl.opencl()
    context = cl.Context([opencl.devices()[0]])
    return cl.CommandQueue(context)


def run(queue, func, inputs: list[np.ndarray], outputs: list[tuple], env: dict) -> list[np.ndarray]:
    """`func` (a TensorIR function: its buffers, inputs then outputs) scheduled for the opencl
    target, built, and run on `inputs`; its outputs, of the given (shape, dtype)s."""
    cl = opencl.opencl()
    group = gpu.build(gpu.default_schedule(func, "opencl"), "opencl")
    flags = cl.mem_flags
    buffers = [cl.Buffer(queue.context, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=np.ascontiguousarray(a))
               if a.size else cl.Buffer(queue.context, flags.READ_WRITE, 4) for a in inputs]
    results = [np.zeros(s, d) for s, d in outputs]
    buffers += [cl.Buffer(queue.context, flags.READ_WRITE, max(r.nbytes, 4)) for r in results]
    opencl.KernelGroup(queue.context, group)(queue, buffers, env)
    for r, b in zip(results, buffers[len(inputs):]):
        if r.size:
            cl.enqueue_copy(queue, r, b)
    queue.finish()
    return results


# llama by default (rotary tables, GQA); the other families' ops with the slow tests
@pytest.mark.parametrize("name,exporter", [("llama-tiny", "dynamo"),
                                           *(pytest.param(*case, marks=pytest.mark.slow) for case in
                                             (("gpt2-tiny", "dynamo"), ("phi-tiny", "torchscript"),
                                              ("gpt-neox-tiny", "dynamo")))])
def test_small_ops_match_reference(name, exporter, queue, rng):
    """The embedding gather and the mask and rotary-table construction of real compiled graphs,
    node by node, fed the reference executor's inputs: dlight's fallback schedule binds each to
    threads, and every output is the reference's."""
    def kernel(node, inputs):
        outs = [(shape(v), v.dtype.numpy()) for v in node.outputs]
        return run(queue, prim_func(node), [np.asarray(a) for a in inputs], outs, ENV)
    assert check_nodes(name, exporter, rng, lambda node, readers: node.op in LOWERINGS, kernel) > 20
