"""GPU schedules, proven through OpenCL on pocl (Debian's pocl-opencl-icd: an OpenCL driver for
this CPU): each kernel scheduled (`gpu.linear`, `gpu.attention`, `gpu.norm`, else
`gpu.lowering.default_schedule`) and built for the opencl target (`backends/tvm/gpu/lowering.py`), its source
built by the driver and launched from its launch table by the runtime's `gpu.KernelGroup`,
against the op's reference, on odd sizes. pocl's speed says nothing about a GPU's; these tests are about results."""

from __future__ import annotations

import numpy as np
import pytest
from small_ops import ENV, check_nodes, shape

from conftest import rel_err

from llmc.backends.tvm import attention, linear, measure, rope_cache
from llmc.backends.tvm.gpu import attention as gpu_attention, linear as gpu_linear, lowering as gpu
from llmc.backends.tvm.injective import LOWERINGS, prim_func
from llmc.ops import get_op
from llmc.runtime import opencl
from llmc.runtime.gpu import KernelGroup

MAX_SEQ = 24


@pytest.fixture(scope="module")
def device():
    return opencl.OpenCLDevice()


def run(device, func, inputs: list[np.ndarray], outputs: list[tuple], env: dict, bindings=None) -> list[np.ndarray]:
    """`func` (a TensorIR function: its buffers, inputs then outputs; or a scheduled IRModule;
    or a kernel group, `gpu.build`'s) scheduled for the opencl target, built (`bindings`: its
    variables that are not run-time dims), and run on `inputs`; its outputs, of the given
    (shape, dtype)s, then the inputs as the kernels left them (a cache written in place)."""
    if isinstance(func, dict):
        group = func
    else:
        mod = func if hasattr(func, "functions") else gpu.default_schedule(func, "opencl")
        group = gpu.build([(mod, bindings, None)], "opencl")
    buffers = [device.upload(np.ascontiguousarray(a)) if a.size else device.alloc(4) for a in inputs]
    results = [np.zeros(s, d) for s, d in outputs]
    buffers += [device.alloc(r.nbytes) for r in results]
    built = device.build(group["source"], [k["name"] for k in group["kernels"]])
    KernelGroup(device, built, group)(buffers, env)
    after = [np.empty_like(a) for a in inputs]
    for r, b in zip(results + after, buffers[len(inputs):] + buffers):
        if r.size:
            device.read(b, r)
    return results + after


# llama by default (rotary tables, GQA); the other families' ops with the slow tests
@pytest.mark.parametrize("name,exporter", [("llama-tiny", "dynamo"),
                                           *(pytest.param(*case, marks=pytest.mark.slow) for case in
                                             (("gpt2-tiny", "dynamo"), ("phi-tiny", "torchscript"),
                                              ("gpt-neox-tiny", "dynamo")))])
def test_small_ops_match_reference(name, exporter, device, rng):
    """The embedding gather and the mask and rotary-table construction of real compiled graphs,
    node by node, fed the reference executor's inputs: dlight's fallback schedule binds each to
    threads, and every output is the reference's."""
    def kernel(node, inputs):
        outs = [(shape(v), v.dtype.numpy()) for v in node.outputs]
        return run(device, prim_func(node), [np.asarray(a) for a in inputs], outs, ENV)[:len(outs)]
    assert check_nodes(name, exporter, rng, lambda node, readers: node.op in LOWERINGS, kernel) > 20


# the slow ones with the slow tests (each builds a kernel group for pocl: seconds)
SMALL_CHUNKS = {"chunk": 8, "threads": 4}  # several chunks, the last one partial, over MAX_SEQ
@pytest.mark.parametrize("spec,seq,past,config", [
    pytest.param(attention.AttentionSpec(4, 2, 16, 0.25), 3, 4, None, marks=pytest.mark.slow),  # masked chunk, GQA
    pytest.param(attention.AttentionSpec(4, 4, 12, 0.3, masked=False, is_causal=True), 5, 0, SMALL_CHUNKS,
                 marks=pytest.mark.slow),  # causal prefill
    (attention.AttentionSpec(6, 2, 16, 0.25, masked=False, is_causal=True, merge_heads=False), 1, 12, SMALL_CHUNKS),
    (attention.AttentionSpec(4, 2, 16, 0.25, kv_int8=True), 3, 14, SMALL_CHUNKS),  # masked chunk, int8 cache
    (attention.AttentionSpec(4, 2, 16, 0.25, softcap=0.7), 3, 14, SMALL_CHUNKS),  # Gemma 2's soft-capping
], ids=["masked-chunk", "causal-prefill", "causal-decode-heads", "int8", "softcap"])
def test_attention_matches_reference(spec, seq, past, config, device, rng):
    """Split-K attention (`gpu.attention`): a work-group per chunk of keys, then the chunks
    combined; a chunk past the keys and a query that sees no key (zeros) included."""
    batch, d, total = 2, spec.head_dim, past + seq
    q = rng.standard_normal((batch, spec.heads, seq, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, spec.kv_heads, MAX_SEQ, d)).astype(np.float32) for _ in range(2))
    caches = [k, v]
    if spec.kv_int8:
        (kq, ks), (vq, vs) = rope_cache.quantize_rows(k), rope_cache.quantize_rows(v)
        k, v, caches = kq * ks[..., None], vq * vs[..., None], [kq, vq, ks, vs]
    mask = np.where(rng.random((batch, 1, seq, total)) < 0.8, 0, -np.inf).astype(np.float32)
    mask[0, 0, 0] = -np.inf  # a query that sees no key gets zeros
    out_shape = (batch, seq, spec.heads * d) if spec.merge_heads else (batch, spec.heads, seq, d)
    env = {"batch": batch, "seq": seq, "past": past, "total": total}
    got = run(device, gpu_attention.schedule(spec, config), [q, *caches] + [mask] * spec.masked,
              [(out_shape, np.float32)],
              env, {"kv_len": "total", "max_seq": str(MAX_SEQ)})[0]
    want = get_op("attention").ref(q, k[:, :, :total], v[:, :, :total], mask if spec.masked else None,
                                   scale=spec.scale, is_causal=int(spec.is_causal), merge_heads=int(spec.merge_heads),
                                   softcap=spec.softcap)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("spec", [rope_cache.RopeCacheSpec(4, 2, 16, 16),
                                  pytest.param(rope_cache.RopeCacheSpec(4, 4, 12, 4), marks=pytest.mark.slow),
                                  pytest.param(rope_cache.RopeCacheSpec(3, 3, 10, 0), marks=pytest.mark.slow),
                                  rope_cache.RopeCacheSpec(4, 2, 16, 16, kv_int8=True),
                                  rope_cache.RopeCacheSpec(4, 2, 12, 12, qk_norm="head", norm_epsilon=1e-6),
                                  rope_cache.RopeCacheSpec(4, 2, 12, 12, qk_norm="all", norm_epsilon=1e-5)],
                         ids=["gqa-full", "partial", "none", "int8", "qk-norm-head", "qk-norm-all"])
@pytest.mark.parametrize("seq,past", [(5, 0), (1, 7)], ids=["prefill", "decode"])
def test_rope_cache_matches_reference(spec, seq, past, device, rng):
    """Queries rotated out, keys and values written into the caches at past + i in place, no
    other row touched."""
    batch, d = 2, spec.head_dim
    qkv = rng.standard_normal((batch, seq, (spec.heads + 2 * spec.kv_heads) * d)).astype(np.float32)
    rd = max(spec.rotary_dim, 2)
    cos, sin = (rng.standard_normal((batch, seq, rd)).astype(np.float32) for _ in range(2))
    int8 = spec.kv_int8
    caches = [rng.integers(-127, 128, (batch, spec.kv_heads, MAX_SEQ, d)).astype(np.int8) if int8 else
              rng.standard_normal((batch, spec.kv_heads, MAX_SEQ, d)).astype(np.float32) for _ in range(2)]
    caches += [rng.random((batch, spec.kv_heads, MAX_SEQ)).astype(np.float32) for _ in range(2 * int8)]
    env = {"batch": batch, "seq": seq, "past": past, "total": past + seq}
    tables = [cos, sin] if spec.rotary_dim else []  # a kernel without rotation takes none
    norms = [(1 + 0.5 * rng.standard_normal(spec.norm_width(h))).astype(np.float32)
             for h in (spec.heads, spec.kv_heads)] if spec.qk_norm else []
    q, *after = run(device, rope_cache.prim_func(spec), [qkv, *tables, *norms, *caches],
                    [((batch, spec.heads, seq, d), np.float32)], env,
                    {"b": "batch", "bt": "batch", "s": "seq", "m": str(MAX_SEQ)})
    after = after[1 + len(tables) + len(norms):]
    qp, kp, vp = np.split(qkv, [spec.heads * d, (spec.heads + spec.kv_heads) * d], axis=-1)
    rotary = spec.rotary_dim > 0
    empty = np.zeros((batch, spec.kv_heads, 0, d), np.float32)
    want_q, want_k, want_v = get_op("rope_cache").ref(qp, kp, vp, cos[:, None] if rotary else None,
                                                      sin[:, None] if rotary else None, empty, empty, None,
                                                      *(norms or [None, None]), heads=spec.heads,
                                                      kv_heads=spec.kv_heads, rotary_dim=spec.rotary_dim % d,
                                                      qk_norm=spec.qk_norm, norm_epsilon=spec.norm_epsilon)
    assert rel_err(q, want_q) < 1e-6
    new = slice(past, past + seq)
    written = [want_k, want_v]
    if int8:
        (kq, ks), (vq, vs) = rope_cache.quantize_rows(want_k), rope_cache.quantize_rows(want_v)
        written = [kq, vq, ks, vs]
    for got, before, w in zip(after, caches, written):
        if got.dtype == np.int8:
            assert np.abs(got[:, :, new].astype(int) - w).max() <= 1  # rounding at ties
        else:
            assert rel_err(got[:, :, new], w) < 1e-6
        untouched = np.ones(MAX_SEQ, bool)
        untouched[new] = False
        np.testing.assert_array_equal(got[:, :, untouched], before[:, :, untouched])


LINEAR_CASES = [dict(bias=True, residual=True), dict(norm="rms", activation="silu", gated=True),
                dict(norm="layer", activation="gelu_tanh", bias=True), dict(activation="gelu", quant="w8", gated=True),
                dict(activation="relu", quant="w4", group_size=32, norm="rms", residual=True),
                dict(quant="w4", group_size=64, norm="layer", gated=True, activation="silu", bias=True),
                dict(half=True, norm="rms", gated=True, activation="silu", residual=True)]
LINEAR_DEFAULT = (1, 3, 5, 6)  # the rest with the slow tests


@pytest.mark.parametrize("rows", [1, 37], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", [c if i in LINEAR_DEFAULT else pytest.param(c, marks=pytest.mark.slow)
                                  for i, c in enumerate(LINEAR_CASES)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_linear_matches_reference(case, rows, device, rng):
    """fused_linear over the weight as the graph holds it ([n, k]; f16; w8; w4 two features a byte),
    the norm prologue and every epilogue, on odd sizes: the kernel group as the backend makes
    it, whose GEMV runs one row and whose tiled GEMM runs 37 (a partial tile)."""
    spec = linear.LinearSpec(n=2 * 50 if case.get("gated") else 50, k=192, plain=True, **case)
    inputs = measure.linear_inputs(spec, rows, rng)
    if spec.half:  # f16 weights (--dtype fp16): the reference multiplies their f32 values
        inputs["w"] = inputs["w"].astype(np.float16)
    want = get_op("fused_linear").ref(*[inputs.get(a) for a in ("x", "w", "bias", "residual", "norm_scale",
                                                                  "norm_bias", "w_scale", "w_zero")],
                                      norm=spec.norm, epsilon=spec.epsilon, activation=spec.activation,
                                      gated=int(spec.gated), quant=spec.quant, group_size=spec.group_size)
    args = [linear.PACKINGS[spec.packing(a)](inputs[a]) if spec.packing(a) else inputs[a]
            for a in spec.arg_names()[:-1]]
    group = gpu.build(gpu_linear.variants(spec, "linear", "seq"), "opencl")
    got = run(device, group, args, [((rows, spec.out_features), np.float32)], {"seq": rows})[0]
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("op,attrs,params", [
    ("rms_norm", {"epsilon": 1e-6}, 1), ("layer_norm", {"epsilon": 1e-5}, 2),
    ("add_norm", {"norm": "rms", "epsilon": 1e-6}, 1), ("add_norm", {"norm": "layer", "epsilon": 1e-5}, 2),
    ("norm_add", {"norm": "rms", "epsilon": 1e-6}, 1)])
def test_norm_matches_reference(op, attrs, params, device, rng):
    """Norms that stand alone (`gpu.norm`): a work-group per row, the statistics in cross-thread
    reductions; add_norm's sum beside them; norm_add's residual in the norm's last stage. Rows over two symbolic dims, 200 features (not a
    multiple of the threads)."""
    from llmc.backends.tvm.gpu import norm as gpu_norm
    from llmc.ir.dtypes import DType
    from llmc.ir.graph import Graph, TensorType
    from llmc.ir.symbolic import Sym

    g, width = Graph(), 200
    shape = (Sym.var("batch"), Sym.var("seq"), width)
    inputs = [g.add_input(f"x{i}", TensorType(shape, DType.f32)) for i in range(2 if op in ("add_norm", "norm_add") else 1)]
    consts = [rng.standard_normal(width).astype(np.float32) for _ in range(params)]
    g.add_node(op, inputs + [g.add_param(f"p{i}", c) for i, c in enumerate(consts)], attrs)
    node = g.nodes[0]
    xs = [rng.standard_normal((2, 3, width)).astype(np.float32) * 3 + 1 for _ in inputs]
    want = get_op(op).ref(*xs, *consts, **node.attrs)
    wants = want if isinstance(want, tuple) else (want,)
    got = run(device, gpu_norm.schedule(prim_func(node)), xs + consts, [(w.shape, np.float32) for w in wants],
              {"batch": 2, "seq": 3})
    for a, w in zip(got, wants):
        assert rel_err(a, w) < 1e-5
