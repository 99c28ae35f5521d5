"""The TVM lowering of the small ops a compiled graph keeps (embedding gather, mask and rotary
table construction), node by node on real compiled graphs: each kernel, fed the reference
executor's inputs for that node, reproduces the reference output exactly (integers, masks) or
within float rounding. And every op of every compiled zoo graph has a TVM kernel or is a view."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from small_ops import ENV, check_nodes, compiled, shape

import llmc
from llmc import zoo
from llmc.backends.tvm.injective import LOWERINGS, build, dim_names
from llmc.backends.tvm.target import host

FUSED = {"fused_linear", "attention", "rope_cache"}  # backends/tvm/{linear,attention,rope_cache}.py


@pytest.mark.parametrize("name,exporter", [("llama-tiny", "dynamo"), ("llama-tiny", "torchscript"),
                                           ("gpt2-tiny", "dynamo"), ("phi-tiny", "torchscript"),
                                           ("gpt-neox-tiny", "dynamo")])
def test_small_ops_match_reference(name, exporter, rng):
    dev = tvm.cpu(0)

    def run(node, inputs):
        outs = [tvm.runtime.tensor(np.zeros(shape(v), v.dtype.numpy()), dev) for v in node.outputs]
        build(node, host())["main"](*[tvm.runtime.tensor(np.array(a, order="C"), dev) for a in inputs], *outs,
                                    *[ENV[d] for d in dim_names(node)])
        return [o.numpy() for o in outs]
    assert check_nodes(name, exporter, rng, lambda node, readers: node.op in LOWERINGS, run) > 25


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_every_op_has_a_kernel(name):
    ops = {n.op for n in compiled(name, "dynamo").nodes}
    assert ops <= set(LOWERINGS) | FUSED, ops - set(LOWERINGS) - FUSED


def _one_node(op, shapes, params=(), **attrs):
    """A graph of one node over inputs of `shapes` (dim `n` symbolic) and constant `params`."""
    from llmc.ir.dtypes import DType
    from llmc.ir.graph import Graph, TensorType
    from llmc.ir.symbolic import Sym

    g = Graph()
    dims = lambda shape: tuple(Sym.var("n") if d == "n" else d for d in shape)  # noqa: E731
    inputs = [g.add_input(f"x{i}", TensorType(dims(s), DType.f32)) for i, s in enumerate(shapes)]
    inputs += [g.add_param(f"p{i}", np.asarray(p)) for i, p in enumerate(params)]
    g.add_node(op, inputs, attrs)
    return g.nodes[0]


@pytest.mark.parametrize("op,shapes,params,attrs", [
    ("transpose", [("n", 3, 5, 4)], [], {"perm": (0, 2, 1, 3)}),
    ("slice", [("n", 2, 12)], [[6], [2 ** 62], [-1], [1]], {}),
    ("slice", [("n", 2, 12)], [[0], [6], [2], [1]], {}),
    ("slice", [("n", 2, 12)], [[-4095], [2 ** 62], [2], [1]], {}),  # Mistral's window: clamped
    ("slice", [("n", 7, 3)], [[1], [7], [1], [2]], {}),
    ("layer_norm", [("n", 3, 24)], [np.float32(np.arange(24) / 7), np.float32(np.arange(24) / 5 - 1)], {"epsilon": 1e-5}),
    ("rms_norm", [("n", 24)], [np.float32(np.arange(24) / 7)], {"epsilon": 1e-6}),
    ("add_norm", [("n", 3, 24)] * 2, [np.float32(np.arange(24) / 7), np.float32(np.arange(24) / 5 - 1)],
     {"norm": "layer", "epsilon": 1e-5}),
    ("add_norm", [("n", 24)] * 2, [np.float32(np.arange(24) / 7)], {"norm": "rms", "epsilon": 1e-6}),
    ("norm_add", [("n", 3, 24)] * 2, [np.float32(np.arange(24) / 7)], {"norm": "rms", "epsilon": 1e-6}),
    ("reduce_max", [("n", 3, 8)], [], {"axes": None, "keepdims": 0}),  # LongRoPE's largest position
    ("reduce_min", [("n", 3, 8)], [], {"axes": (1,), "keepdims": 1}),
    ("reduce_sum", [("n", 3, 8)], [], {"axes": (0, 2), "keepdims": 0}),
    ("reduce_mean", [("n", 3, 8)], [], {"axes": (-1,), "keepdims": 1}),
    ("rotary", [("n", 4, 3, 12), ("n", 1, 3, 12), ("n", 1, 3, 12)], [], {"rotary_dim": 0}),  # no cache kernel took it
    ("rotary", [("n", 2, 3, 12), (1, 1, 3, 4), (1, 1, 3, 4)], [], {"rotary_dim": 4}),  # partial, tables of one sequence
    ("silu", [("n", 3, 8)], [], {}),  # activations no GEMM took (Phi-3's split gate before the fix)
    ("relu", [("n", 8)], [], {}),
    ("gelu", [("n", 8)], [], {"approximate": "tanh"}),
])
def test_lowering_matches_reference(op, shapes, params, attrs, rng):
    """The lowerings torch.compile graphs need besides the exported ones (transpose, slice, norms
    and activations on their own), and add_norm (a residual add that no GEMM took, and the norm after it), on a
    symbolic leading dim."""
    node = _one_node(op, shapes, params, **attrs)
    n = int(rng.integers(1, 5))
    xs = [rng.standard_normal([n if d == "n" else d for d in s]).astype(np.float32) for s in shapes]
    consts = [np.asarray(p) for p in params]
    want = llmc.ops.get_op(op).ref(*xs, *consts, **node.attrs)
    wants = want if isinstance(want, tuple) else (want,)  # add_norm: the sum and its norm
    dev = tvm.cpu(0)
    outs = [tvm.runtime.tensor(np.zeros(w.shape, w.dtype), dev) for w in wants]
    args = [tvm.runtime.tensor(a, dev) for a in xs + [np.array(c, order="C") for c in consts]]
    build(node, host())["main"](*args, *outs, *[n for _ in dim_names(node)])
    for out, w in zip(outs, wants):
        np.testing.assert_allclose(out.numpy(), w, rtol=1e-5, atol=1e-6)


def test_slices_with_different_starts_get_different_kernels():
    """Kernels are shared by node key; a slice's starts are compiled in, so they are in the key."""
    from llmc.backends.plan import node_key as _node_key

    lo = _one_node("slice", [("n", 2, 12)], [[0], [6], [-1], [1]])
    hi = _one_node("slice", [("n", 2, 12)], [[6], [12], [-1], [1]])
    assert lo.outputs[0].type == hi.outputs[0].type
    assert _node_key(lo) != _node_key(hi)
