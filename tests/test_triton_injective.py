"""The generated Triton kernels of the small ops (`backends/triton/injective.py`), node by node
on real compiled graphs, under Triton's interpreter: each, fed the reference executor's inputs
for its node and the run-time dims (batch and seq as arguments, past and total from D), gives
the reference output exactly (integers, masks) or within float rounding. And every op of every
compiled zoo graph has a Triton kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
from small_ops import ENV, check_nodes, compiled, shape

import llmc
from llmc import zoo
from llmc.backends.plan import feeds_rope_cache
from llmc.backends.triton import injective
from llmc.ir.symbolic import evaluate
from llmc.runtime.interpret import load_package

torch = pytest.importorskip("torch")

FUSED = {"fused_linear", "attention", "rope_cache", "add_norm", "norm_add", "rms_norm", "layer_norm"}  # kernels/*.py


def _run(node, inputs, outs, env, tmp_path):
    """Generate the node's kernel into a package of its own, and launch it interpreted."""
    folder = tmp_path / f"k{id(node)}"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "gen.py").write_text("import triton\nimport triton.language as tl\n\n\n" + injective.source(node, "kernel"))
    kernel = load_package(folder, ["gen"])["gen"].kernel
    size = math.prod(evaluate(d, env) for d in injective.grid_shape(node))
    dims = torch.tensor([env["past"], env["total"]], dtype=torch.int32)
    tensors = [torch.from_numpy(np.array(a, order="C")) for a in inputs]
    kernel[(max(1, -(-size // injective.BLOCK)),)](*tensors, *outs, dims, env["batch"], env["seq"],
                                                    BLOCK=injective.BLOCK)


@pytest.mark.parametrize("name,exporter", [("llama-tiny", "dynamo"), ("llama-tiny", "torchscript"),
                                           ("gpt2-tiny", "dynamo"), ("phi-tiny", "torchscript"),
                                           ("mistral-tiny", "dynamo"), ("opt-tiny", "dynamo")])
def test_small_ops_match_reference(name, exporter, rng, tmp_path):
    def kernel_of(node, readers):  # a split into rope_cache is read whole by it: no kernel
        return node.op in injective.LOWERINGS and not feeds_rope_cache(node, readers)

    def run(node, inputs):
        outs = [torch.from_numpy(np.zeros(shape(v), v.dtype.numpy())) for v in node.outputs]
        _run(node, inputs, outs, ENV, tmp_path)
        return [o.numpy() for o in outs]
    assert check_nodes(name, exporter, rng, kernel_of, run) > 20


@pytest.mark.parametrize("name", [m.name for m in zoo.TINY_DECODERS])
def test_every_op_has_a_kernel(name):
    ops = {n.op for n in compiled(name, "dynamo").nodes}
    assert ops <= set(injective.LOWERINGS) | FUSED, ops - set(injective.LOWERINGS) - FUSED


def _one_node(op, shapes, params=()):
    from llmc.ir.dtypes import DType
    from llmc.ir.graph import Graph, TensorType
    from llmc.ir.symbolic import Sym

    g = Graph()
    dims = lambda shape: tuple(Sym.var("batch") if d == "n" else d for d in shape)  # noqa: E731
    inputs = [g.add_input(f"x{i}", TensorType(dims(s), DType.f32)) for i, s in enumerate(shapes)]
    inputs += [g.add_param(f"p{i}", np.asarray(p)) for i, p in enumerate(params)]
    return g, inputs


@pytest.mark.parametrize("op,shapes,params,attrs", [
    ("transpose", [("n", 3, 5, 4)], [], {"perm": (0, 2, 1, 3)}),
    ("slice", [("n", 2, 12)], [[6], [2 ** 62], [-1], [1]], {}),
    ("slice", [("n", 2, 12)], [[-4095], [2 ** 62], [2], [1]], {}),  # Mistral's window: clamped
    ("slice", [("n", 7, 3)], [[1], [7], [1], [2]], {}),
    ("concat", [("n", 2, 5), ("n", 2, 3)], [], {"axis": -1}),
    ("expand", [(1, 3, 1)], [[4, 3, 5]], {}),
    ("gelu", [("n", 7)], [], {"approximate": "tanh"}),
    ("silu", [("n", 7)], [], {}),
    ("relu", [("n", 7)], [], {}),
    ("where", [("n", 6)], [], {}),
    ("rotary", [("n", 4, 3, 12), ("n", 1, 3, 12), ("n", 1, 3, 12)], [], {"rotary_dim": 0}),  # no cache kernel took it
    ("rotary", [("n", 2, 3, 12), (1, 1, 3, 4), (1, 1, 3, 4)], [], {"rotary_dim": 4}),  # partial, tables of one sequence
    ("reduce_max", [("n", 3, 8)], [], {"axes": None, "keepdims": 0}),  # LongRoPE's largest position
    ("reduce_min", [("n", 3, 8)], [], {"axes": (1,), "keepdims": 1}),
    ("reduce_sum", [("n", 3, 8)], [], {"axes": (0, 2), "keepdims": 0}),
    ("reduce_mean", [("n", 3, 8)], [], {"axes": (-1,), "keepdims": 1}),
])
def test_one_op_matches_reference(op, shapes, params, attrs, rng, tmp_path):
    """Ops the zoo's graphs do not all hold (transpose, slices, concat, expand, reductions), on a
    symbolic leading dim (batch, passed as an argument)."""
    g, inputs = _one_node(op, shapes, params)
    if op == "where":
        from llmc.ir.dtypes import DType
        from llmc.ir.graph import TensorType
        from llmc.ir.symbolic import Sym

        cond = g.add_input("c", TensorType((Sym.var("batch"), 6), DType.bool))
        inputs = [cond, inputs[0], g.add_param("other", np.float32(-np.inf))]
    g.add_node(op, inputs, attrs)
    node = g.nodes[0]
    n = int(rng.integers(1, 5))
    env = {"batch": n, "seq": 1, "past": 0, "total": 1}
    xs = [rng.standard_normal([n if d == "n" else d for d in s]).astype(np.float32) for s in shapes]
    consts = [np.asarray(p) for p in params]
    if op == "where":
        xs = [rng.random((n, 6)) < 0.5, xs[0]]
        consts = [np.float32(-np.inf)]
    want = llmc.ops.get_op(op).ref(*xs, *consts, **node.attrs)
    out = torch.zeros(want.shape, dtype=torch.float32)
    args = xs + consts if op != "expand" else xs
    _run(node, args, [out], env, tmp_path)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
