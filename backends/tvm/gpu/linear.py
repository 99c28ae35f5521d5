"""`fused_linear` on GPUs (opencl, metal): its TensorIR function over the weight as the graph
holds it, and its two schedules, a GEMV for few rows (decode) and a tiled GEMM for many
(prefill), both launched from one kernel group, each on the rows it serves.

    h = norm(x)                                  rms or layer norm, when asked
    sums[i, p, j] = sum_k h[i, k] * w[p, j, k]    p: the gate's two halves (gated), else one
    y[i, j] = epilogue(sums[i, :, j])             scale (w8), bias, activation or gate, residual

The weight [n, k] is read as [parts, n / parts, k], the same bytes: output j of a gated GEMM
needs rows j and n/2 + j, and with the halves on their own axis a work-group's tile of outputs
reads two tiles of the weight, not the rows between them. w8 is int8 with a scale per output
channel, applied to the sums; w4 is two input features a byte (`plan.pair_nibbles`) with a
scale and a zero per group; fp16 (`--dtype fp16`) is f16, converted from its bits
(`_from_half`). All are dequantized in registers as read (decode) or as a tile goes to local
memory (prefill): no f32 copy of the weights exists.

Decode (`schedule_decode`): a work-group owns `outputs` output features of one row, and
`threads` threads share each one's reduction: thread t reads `vector` consecutive input
features at t * vector, then steps by threads * vector, so a row of threads reads one
contiguous span of the weight row (coalesced), and the partial sums meet in one cross-thread
reduction. The norm's statistics are computed the same way by each group, from the row it
reads anyway (no kernel of their own); the epilogue follows in registers. One kernel.

Prefill (`schedule_prefill`): a work-group owns a tile of rows x outputs (`tile`), 8 x 8
threads each a register tile of it; per step of `depth` input features the group stages the
normed rows and the dequantized weights of its tile in local memory and every thread
multiplies from there, so each value read from global memory serves a tile of outputs. The
norm's statistics are a kernel before it (one group per row, a cross-thread reduction).

Which one runs: rows below DECODE_ROWS take the GEMV, the rest the GEMM (`variants`). Both
are in the artifact; each kernel's grid is multiplied by its condition (1 or 0 at run time),
and the runtimes skip an empty grid.
"""

from __future__ import annotations

from dataclasses import replace

from .. import linear
from . import lowering
from ...knobs import Knob

DECODE_ROWS = 4  # rows from which the tiled GEMM runs: below, each row re-reads the weights
GEMV = ("4x64", "2x128", "8x32", "1x256", "16x16")  # outputs per group x threads per output
VECTORS = (4, 2, 8)  # consecutive input features a GEMV thread reads per step
TILES = ("32x32", "64x64", "32x64", "64x32", "16x16")  # a prefill group's rows x outputs
DEPTHS = (16, 32, 8)  # input features per local-memory step
THREADS = 8, 8  # a prefill group's threads: rows x outputs
STATS = 64  # threads of a norm-statistics group (prefill)
PREFILL_ROWS = 128  # the row count the prefill knobs are measured at


def variants(spec: linear.LinearSpec, name: str, rows: str, config: dict | None = None) -> list[tuple]:
    """The kernel group's variants as `lowering.group_table` takes them, built: (the GEMV, named
    `name`_gemv, run below DECODE_ROWS rows; the GEMM, `name`_gemm, from there on); `rows`: the
    rows as an expression over the run-time dims; `config`: knob values (`knobs`)."""
    many = f"min(({rows}) // {DECODE_ROWS}, 1)"  # 1 from DECODE_ROWS rows on, else 0
    return [(lowering.named(schedule_decode(spec, config), f"{name}_gemv"), {"m": rows}, f"(1 - {many})"),
            (lowering.named(schedule_prefill(spec, config), f"{name}_gemm"), {"m": rows}, many)]


def spec_of(node, graph) -> linear.LinearSpec:
    return replace(linear.LinearSpec.of(node, graph), plain=True, half=node.inputs[1].dtype.numpy().name == "float16")


def _from_half(bits):
    """An f16 weight's bits (uint16) as f32, without the half type (OpenCL devices need
    cl_khr_fp16 for it; pocl has none): the exponent and mantissa shifted into f32's places and
    rebiased by a multiply by 2^112 (exact for normal and subnormal values), then the sign."""
    from tvm import tirx

    b = bits.astype("uint32")
    magnitude = tirx.reinterpret("float32", (b & tirx.const(0x7FFF, "uint32")) << tirx.const(13, "uint32")) \
        * tirx.const(2.0 ** 112, "float32")
    return tirx.Select((b & tirx.const(0x8000, "uint32")) != tirx.const(0, "uint32"), -magnitude, magnitude)


def knobs(spec: linear.LinearSpec) -> list[Knob]:
    """The schedules' knobs, defaults first: the GEMV's group shape and vector width, the GEMM's
    tile and depth (`lowering.split_exactly` may take less where k needs it)."""
    return [Knob("gemv", GEMV, 1), Knob("vector", VECTORS, 1), Knob("tile", TILES, PREFILL_ROWS),
            Knob("depth", DEPTHS, PREFILL_ROWS)]


def default_config(spec: linear.LinearSpec) -> dict:
    return {k.name: k.values[0] for k in knobs(spec)}


def prim_func(spec: linear.LinearSpec, row_tile: int = 0):
    """The GEMM as a TensorIR function (unscheduled): the arguments of `spec.arg_names()`, the
    weight [n, k] (w4: [n, k / 2] bytes) and its per-channel vectors read as [parts, n / parts].
    With `row_tile`, the sums run over the rows padded to a multiple of it, the rows past the
    last repeating it ("rows"): every tile is then whole, and its buffers of constant size."""
    from tvm import te, tirx

    m = tirx.Var("m", "int64")
    k, dt, out = spec.k, spec.dtype, spec.out_features
    parts = 2 if spec.gated else 1
    x = te.placeholder((m, k), dt, name="x")
    args = {"x": x}
    h = linear.normed(spec, x, m, args)
    if row_tile:
        padded = (m + row_tile - 1) // row_tile * row_tile
        h = te.compute((padded, k), lambda i, kk: h[tirx.min(i, m - 1), kk], name="rows")
    if spec.quant == "w4":
        groups = k // spec.group_size
        w = args["w"] = te.placeholder((parts, out, k // 2), "uint8", name="w")
        scale = args["w_scale"] = te.placeholder((parts, out, groups), dt, name="w_scale")
        zero = args["w_zero"] = te.placeholder((parts, out, groups), dt, name="w_zero")

        def weight(p, j, kk):
            nibble = (w[p, j, kk // 2] >> (kk % 2 * 4).astype("uint8")) & tirx.const(15, "uint8")
            g = kk // spec.group_size
            return (nibble.astype(dt) - zero[p, j, g]) * scale[p, j, g]
    elif spec.half:
        w = args["w"] = te.placeholder((parts, out, k), "uint16", name="w")
        weight = lambda p, j, kk: _from_half(w[p, j, kk])  # noqa: E731
    else:
        w = args["w"] = te.placeholder((parts, out, k), "int8" if spec.quant == "w8" else dt, name="w")
        weight = lambda p, j, kk: w[p, j, kk].astype(dt)  # noqa: E731
    channel = None
    if spec.quant == "w8":
        channel = args["w_scale"] = te.placeholder((parts, out), dt, name="w_scale")
    wdq = te.compute((parts, out, k), weight, name="wdq")
    r = te.reduce_axis((0, k), name="kk")
    sums = te.compute((h.shape[0], parts, out), lambda i, p, j: te.sum(h[i, r] * wdq[p, j, r], axis=r), name="sums")
    bias = args["bias"] = te.placeholder((parts, out), dt, name="bias") if spec.bias else None
    res = args["residual"] = te.placeholder((m, out), dt, name="residual") if spec.residual else None

    def pre(i, p, j):
        a = sums[i, p, j] * channel[p, j] if channel is not None else sums[i, p, j]
        return a + bias[p, j] if bias is not None else a

    act = linear._activate(te.compute((m, out), lambda i, j: pre(i, 0, j), name="gate"), spec.activation)

    def epilogue(i, j):
        v = act[i, j] * pre(i, 1, j) if spec.gated else act[i, j]
        return v + res[i, j] if res is not None else v

    y = te.compute((m, out), epilogue, name="y")
    return te.create_prim_func([args[a] for a in spec.arg_names()[:-1]] + [y])


def _stats(spec: linear.LinearSpec) -> list[str]:
    """The norm's per-row reductions, each after the one it reads."""
    return {"rms": ["sumsq"], "layer": ["sum", "sqdev"]}.get(spec.norm, [])


def _inline(sch, keep=()) -> None:
    """Every stage that only computes elements inlined into its readers (the norm, the
    dequantization, the epilogue's), but the output and those in `keep`."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stage = sch.get(block)
        if stage.name_hint not in (*keep, "y") and all(v.iter_type == 0 for v in stage.iter_vars):
            sch.compute_inline(block)


def schedule_decode(spec: linear.LinearSpec, config: dict | None = None):
    """The GEMV (module docstring): group (row, `outputs` features), `threads` threads per
    feature. Launch: blockIdx.x = ceil(out / outputs), blockIdx.y = rows; threadIdx.y =
    outputs, threadIdx.x = threads."""
    import tvm

    config = {**default_config(spec), **(config or {})}
    outputs, threads = (int(v) for v in config["gemv"].split("x"))
    threads, vector = lowering.split_exactly(spec.k, threads, config["vector"])
    sch = tvm.s_tir.Schedule(prim_func(spec))
    _inline(sch)
    reductions = [sch.get_sblock(name) for name in _stats(spec)] + [sch.get_sblock("sums")]
    partials = [lowering.rfactor(sch, block, threads, vector if block == reductions[-1] else 1) for block in reductions]
    i, j = sch.get_loops(sch.get_sblock("y"))
    jo, ji = sch.split(j, [None, outputs])
    sch.bind(i, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(ji, "threadIdx.y")
    # each group reduces its row's norm statistics itself, from the row it reads anyway
    for block, partial in reversed(list(zip(reductions, partials))):
        sch.compute_at(block, ji)
        sch.compute_at(partial, ji)
    for block, partial in zip(reductions, partials):
        lowering.bind_reduction(sch, block, partial, 3)
    return sch.mod


def schedule_prefill(spec: linear.LinearSpec, config: dict | None = None):
    """The tiled GEMM (module docstring). Launch: blockIdx.x = ceil(out / outputs), blockIdx.y
    = ceil(rows / rows per tile), threadIdx 8 x 8; the statistics kernels: blockIdx.x = rows,
    threadIdx.x = 64."""
    import tvm

    config = {**default_config(spec), **(config or {})}
    rows, cols = (int(v) for v in config["tile"].split("x"))
    depth = lowering.split_exactly(spec.k, config["depth"], 1)[0]
    sch = tvm.s_tir.Schedule(prim_func(spec, rows))
    _inline(sch, keep=("rows", "wdq"))
    ty, tx = THREADS
    i, j = sch.get_loops(sch.get_sblock("y"))
    io, ti, ri = sch.split(i, [None, ty, rows // ty])
    jo, tj, rj = sch.split(j, [None, tx, cols // tx])
    sch.reorder(io, jo, ti, tj, ri, rj)
    sch.bind(io, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(ti, "threadIdx.y")
    sch.bind(tj, "threadIdx.x")
    sums = sch.get_sblock("sums")
    sch.set_scope(sums, 0, "local")  # each thread's accumulators
    sch.compute_at(sums, tj)
    *tile, red = sch.get_loops(sums)[4:]  # (rows, the gate's halves when gated, outputs), the reduction
    ko, ki = sch.split(red, [None, depth])
    sch.reorder(ko, ki, *tile)
    # the group's tile of the operands, staged in local memory for each step over the features
    for stage in (sch.get_sblock("rows"), sch.get_sblock("wdq")):
        sch.set_scope(stage, 0, "shared")
        sch.compute_at(stage, ko)
        _, by, bx = sch.split(sch.fuse(*sch.get_loops(stage)[5:]), [None, ty, tx])
        sch.bind(by, "threadIdx.y")
        sch.bind(bx, "threadIdx.x")
    sch.unroll(ki)
    for name in _stats(spec):
        block = sch.get_sblock(name)
        partial = lowering.rfactor(sch, block, lowering.split_exactly(spec.k, STATS, 1)[0])
        sch.bind(sch.get_loops(block)[0], "blockIdx.x")
        sch.compute_at(partial, sch.get_loops(block)[0])
        lowering.bind_reduction(sch, block, partial, 1, "global")  # read by the GEMM kernel
    return sch.mod
