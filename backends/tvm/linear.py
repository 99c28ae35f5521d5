"""`fused_linear` as a TVM kernel: norm prologue, GEMV/GEMM over constant weights, epilogue.

    h = norm(x)                 rms or layer norm over the features, when asked
    acc[m, n] = sum_k h[m, k] * w[n, k]
    y = epilogue(acc)           + bias, activation or gate (act(acc[:, :n/2]) * acc[:, n/2:]),
                                + residual

Rows (batch * seq) are symbolic, so one build serves decode (1 row) and prefill.

The weight is packed once, at compile time, to [n/64, k, 64] (n padded to a multiple of 64): the
64 output features a parallel task owns lie together for each input feature (`pack`). Output
features then sit in vector lanes: a row's product is a stream of broadcast-multiply-adds into
16-lane accumulators, with no horizontal reduction, and each task reads one contiguous stream.
(With [n/16, k, 16], four streams per task, int8 and 4-bit decode read 13% and 37% slower: at 16
bytes per step and stream the prefetchers fell behind.)

From `rows` rows on (prefill), rows go in blocks of `rows`; the last block's rows past m repeat
row m - 1 (a clamped index, not a bounds predicate: a predicated row loop keeps LLVM from
holding the accumulators in registers). Each parallel task owns 64 output features and runs
every row block over them: a register tile of `rows` rows x `cols` vectors of 16 features over
the whole reduction, so each weight vector loaded serves `rows` rows and a task's weights stay in
its L2 across row blocks. The tile is a knob (`knobs`): 6 x 4 vectors fills 24 of AVX-512's 32
registers, and with 128 rows runs at 440-480 GFLOP/s on both Zen 5 cores, as fast as
onnxruntime's MLAS; AVX2's 16 registers hold a quarter of that (each 16-lane vector is two).
Fewer rows (decode) go one by one over the same tasks, which then read the weights at memory
bandwidth (llmc.tools.gemv_bandwidth); a clamped 6-row tile would do 6x the arithmetic,
which dequantizing kernels feel.

Quantized weights (`quant`): int8 with a per-channel scale applied to the sums, or 4-bit
nibbles (two input features per byte) with per-group scales and zeros. Decode dequantizes in the
inner loop as it reads (4-bit: scales and zeros per group, not per weight); int8 prefill too. A
4-bit prefill task dequantizes its 64 features once into a scratch tile (k x 64 floats, in its
L2) and runs every row block over it: as fast as f32, where dequantizing per row block took
1.7x as long. No f32 copy of the weights exists.

With int8 activations (`act_block`, passes/quantize_activations.py) the kernel is another one
(`_integer_rows`, `_schedule_integer`): the input is quantized per block of 32 features, and
each block's products are integer dot products by the CPU's instruction (`int_dot`: VNNI or
AVX2), over weights packed per block in the order they are read (`pack_words`,
`pack_nibble_words`). Decode and prefill share it; a prefill task runs every row over its 64
features, whose weights stay in its L2.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from . import int_dot
from ..packing import NIBBLES, pair_nibbles
from ..knobs import Knob

LANES, TILE = 16, 4  # vector lanes (output features), vectors per parallel task (its 64 features)
EPILOGUE_STAGES = {"pre", "gate", "act", "erf_arg", "T_fast_erf", "gelu", "tanh_arg", "T_fast_tanh",
                   "gelu_tanh", "exp_arg", "T_fast_exp", "silu"}  # inlined into y


PREFILL_ROWS = 128  # the row count the prefill knobs are measured at


TILES = ("6x4", "6x2", "6x1", "4x1", "5x1", "3x1", "2x2", "3x2", "4x2", "8x1", "4x4", "12x1")


def _accumulators(tile: str, lanes: int) -> int:
    """Vector registers a register tile's accumulators take."""
    rows, cols = (int(v) for v in tile.split("x"))
    return rows * cols * max(1, LANES // lanes)


def default_tile(registers: int, lanes: int) -> str:
    """The cost model that sets the prefill register tile when nothing was measured: 6 rows (each
    weight vector loaded serves 6 rows) and as many vectors of 16 features as keep the
    accumulators within 3/4 of the vector registers (the rest hold the weights and a broadcast
    row). AVX-512 (32 x 16 lanes): 6x4; AVX2 (16 x 8): 6x1; NEON (32 x 4): 6x1. On Zen 3 (AVX2),
    6x4 spilled and ran a 128-row GEMM at 59 GFLOP/s, 6x1 at 159."""
    cols = next((c for c in (4, 2) if _accumulators(f"6x{c}", lanes) <= registers * 3 // 4), 1)
    return f"6x{cols}"


def knobs(spec: "LinearSpec", registers: tuple[int, int] = (32, 16)) -> list[Knob]:
    """The schedule's tunable knobs, each with its default first, for a CPU with `registers`
    (vector registers, f32 lanes each). f32 activations: the prefill register tile ("rows x
    vectors of 16 features"; those whose accumulators outnumber the registers are not tried),
    whether row blocks or feature sub-tiles run outer, and the decode
    GEMV's reduction unrolling (not for 4-bit, whose reduction is by groups). The integer
    kernel has none yet."""
    if spec.act_block:
        return []
    tile = default_tile(*registers)
    fits = [t for t in TILES if t != tile and _accumulators(t, registers[1]) <= registers[0]]  # the rest spill
    out = [Knob("tile", (tile, *fits), PREFILL_ROWS),
           Knob("order", ("rows", "cols"), PREFILL_ROWS)]
    if spec.quant != "w4":
        out.append(Knob("unroll", tuple(u for u in (1, 2, 4, 8) if spec.k % u == 0), 1))
    return out


def default_config(spec: "LinearSpec", registers: tuple[int, int] = (32, 16)) -> dict:
    return {k.name: k.values[0] for k in knobs(spec, registers)}


def _tile(config: dict) -> tuple[int, int]:
    rows, cols = config.get("tile", "6x4").split("x")
    return int(rows), int(cols)


def packed_rows(n: int) -> int:
    """Vectors of 16 features in the packed weight: n padded to whole tiles."""
    return -(-n // (LANES * TILE)) * TILE


def pack_nibbles(q):
    """[n, k] 4-bit values (uint8 0..15) -> [n / 64, k / 2, 64] bytes: input features 2i and
    2i + 1 of an output feature in the low and high nibble of one byte."""
    return pair_nibbles(pack(q))


def pack(w):
    """[n, k] weight -> [n / 64, k, 64], zero-padded: the layout the kernel reads, one parallel
    task's 64 features of each input feature together (a single stream per task)."""
    import numpy as np

    n, k = w.shape
    width = TILE * LANES
    out = np.zeros((packed_rows(n) * LANES // width, k, width), w.dtype)
    full = n // width  # filled block by block: no padded or transposed copy of a large weight
    out[:full] = w[:full * width].reshape(full, width, k).transpose(0, 2, 1)
    if n % width:
        out[full, :, :n % width] = w[full * width:].T
    return out


def gather_packed(node):
    """A PrimFunc for a row lookup (`gather` on axis 0: the token embedding) that reads the table
    from its `pack`ed copy [n / 64, k, 64], row j at [j / 64, :, j % 64]: a tied embedding served
    from the LM head's weight, so the artifact stores the table once. Arguments: the packed table,
    the ids, the rows, then the named dims (`injective.dim_names`)."""
    from tvm import te, tirx

    from .injective import Dims

    table, ids = node.inputs[:2]
    (n, k), block = table.shape, TILE * LANES
    dims = Dims()
    packed = te.placeholder((packed_rows(n) // TILE, k, block), table.dtype.numpy().name, name="table")
    index = te.placeholder(dims.shape(ids.shape), ids.dtype.numpy().name, name="ids")

    def body(*i):
        j = index(*i[:-1]).astype("int64")
        j = tirx.Select(j < 0, j + n, j)
        return packed[j // block, i[-1], j % block]
    rows = te.compute(dims.shape(node.outputs[0].shape), body, name="gather")
    return te.create_prim_func([packed, index, rows] + [dims.vars[d] for d in sorted(dims.vars)])


def pack_words(q, reg: int, signed: bool):
    """int8 [n, k] -> [n / 64, k / 32, 64 / reg, 8, reg, 4] (`_words`): int8 values, or uint8
    value + 128 (`int_dot.signed_weights`)."""
    import numpy as np

    return _words(q if signed else (q.astype(np.int16) + 128).astype(np.uint8), reg, 8)


def pack_nibble_words(q, reg: int):
    """4-bit [n, k] (0..15) -> uint8 [n / 64, k / 32, 64 / reg, 4, reg, 4] (`_words`): byte c
    of word i holds input feature 8i + c in its low nibble and 8i + 4 + c in its high one."""
    import numpy as np

    q = q.astype(np.uint8).reshape(q.shape[0], -1, 2, 4)
    return _words(np.ascontiguousarray(q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], -1), reg, 4)


def _words(b, reg: int, per_block: int):
    """Bytes [n, k'] in the integer kernel's order (int_dot): a parallel task's 64 output
    features, then per block of 32 input features the features a register tile holds (`reg`),
    then the block's words (4 bytes: 4 input features, or 8 as nibbles) of each of them side
    by side. A task's weights are one stream, read in order."""
    import numpy as np

    n, k = b.shape
    padded = np.zeros((packed_rows(n) * LANES, k), b.dtype)
    padded[:n] = b
    blocks = padded.reshape(-1, 64 // reg, reg, k // 4 // per_block, per_block, 4)
    return np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 2, 5))


# the packed copy of a weight is named after the graph's with one of these suffixes
_REGISTERS = sorted({4 * lanes for lanes in int_dot.ISAS.values()})  # LinearSpec.register_width
PACKINGS = {".packed16": pack, ".nibbles16": pack_nibbles, NIBBLES: pair_nibbles,
            **{f".words{r}": functools.partial(pack_words, reg=r, signed=False) for r in _REGISTERS},
            **{f".swords{r}": functools.partial(pack_words, reg=r, signed=True) for r in _REGISTERS},
            **{f".nibblewords{r}": functools.partial(pack_nibble_words, reg=r) for r in _REGISTERS}}


def _at(t, jb, kk, lane):
    """Element (vector jb, input feature kk, lane) of a tensor laid out by `pack`."""
    return t[jb // TILE, kk, jb % TILE * LANES + lane]


def _nibble(w, jb, kk, lane):
    """The 4-bit value (0..15) of input feature kk in a weight laid out by `pack_nibbles`."""
    return (_at(w, jb, kk // 2, lane) >> (kk % 2 * 4).astype("uint8")) & 15


@dataclass(frozen=True)
class LinearSpec:
    """What one `fused_linear` kernel computes. n: output features of the GEMM (before a gate)."""

    n: int
    k: int
    dtype: str = "float32"
    bias: bool = False
    residual: bool = False
    norm: str = ""  # "", "rms", "layer"
    epsilon: float = 1e-5
    activation: str = ""  # "", "relu", "silu", "gelu", "gelu_tanh"
    gated: bool = False
    quant: str = ""  # "", "w8", "w4": the weight's encoding (ops.transformer.dequantize)
    group_size: int = 0
    act_block: int = 0  # int8 activations in blocks of this many features: integer dot products
    isa: str = ""  # with act_block: the instruction set of the dot products (int_dot.ISAS)
    plain: bool = False  # the weight as the graph holds it, [n, k] (the GPU schedules': `gpu.linear`)
    half: bool = False  # an f16 weight (`--dtype fp16`, passes/half_weights.py; the GPU schedules')

    @property
    def out_features(self) -> int:
        return self.n // 2 if self.gated else self.n

    @staticmethod
    def of(node, graph) -> "LinearSpec":
        """The spec of a `fused_linear` node of the IR."""
        x, w, bias, residual = (list(node.inputs) + [None] * 4)[:4]
        n, k = w.shape
        return LinearSpec(n=n, k=k, dtype=x.dtype.numpy().name, bias=bias is not None,
                          residual=residual is not None, norm=node.attrs["norm"],
                          epsilon=node.attrs["epsilon"], activation=node.attrs["activation"],
                          gated=bool(node.attrs["gated"]), quant=node.attrs["quant"],
                          group_size=node.attrs["group_size"], act_block=node.attrs["act_block"])

    def arg_names(self) -> list[str]:
        """The kernel's arguments, in order."""
        names = ["x", "w"]
        names += ["bias"] * self.bias + ["residual"] * self.residual
        names += ["norm_scale"] * bool(self.norm) + ["norm_bias"] * (self.norm == "layer")
        names += ["w_scale"] * bool(self.quant) + ["w_zero"] * (self.quant == "w4")
        return names + ["y"]

    @property
    def register_width(self) -> int:
        """Output features of the integer kernel's register tile: 4 vectors of the ISA's lanes
        (a parallel task holds 64)."""
        return 4 * int_dot.ISAS.get(self.isa, 8)

    def packing(self, arg: str) -> str | None:
        """How a weight argument is laid out for the kernel: a key of PACKINGS (the suffix its
        packed copy is named with), or None (passed as the graph holds it)."""
        if arg == "w" and self.act_block:
            kind = "nibble" if self.quant == "w4" else "s" if int_dot.signed_weights(self.isa, self.quant) else ""
            return f".{kind}words{self.register_width}"
        if arg == "w" and self.plain:
            return NIBBLES if self.quant == "w4" else None
        if arg == "w":
            return ".nibbles16" if self.quant == "w4" else ".packed16"
        if arg in ("w_scale", "w_zero") and self.quant == "w4" and not self.plain:
            return ".packed16"  # [n, groups] -> [n/64, groups, 64]: a group's scales in vector lanes
        return None


def activation_expr(v, activation: str):
    """act(v) for one element, with TVM's intrinsics."""
    from tvm import te

    if activation == "relu":
        return te.max(v, 0.0)
    if activation == "silu":
        return v * te.sigmoid(v)
    if activation == "gelu":
        return 0.5 * v * (1.0 + te.erf(v * (1 / math.sqrt(2))))
    if activation == "gelu_tanh":
        return 0.5 * v * (1.0 + te.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v * v * v)))
    return v


def _activate(t, activation: str):
    """act(t) as a tensor, for the epilogue. erf, tanh and exp there use TVM's polynomial
    approximations (erf and tanh Eigen's): the intrinsics compile to scalar library calls, and a
    GELU epilogue took 3x longer than its 128-row GEMM. Every stage here is inlined into the
    epilogue."""
    from tvm import te, topi

    def ew(fn, *ts, name):
        return te.compute(t.shape, lambda *i: fn(*(x(*i) for x in ts)), name=name)

    if activation == "gelu":
        erf = topi.fast_erf(ew(lambda v: v * (1 / math.sqrt(2)), t, name="erf_arg"))
        return ew(lambda v, e: 0.5 * v * (1.0 + e), t, erf, name="gelu")
    if activation == "silu":
        exp = topi.fast_exp(ew(lambda v: -v, t, name="exp_arg"))
        return ew(lambda v, e: v / (1.0 + e), t, exp, name="silu")
    if activation == "gelu_tanh":
        tanh = topi.fast_tanh(ew(lambda v: math.sqrt(2 / math.pi) * (v + 0.044715 * v * v * v), t, name="tanh_arg"))
        return ew(lambda v, th: 0.5 * v * (1.0 + th), t, tanh, name="gelu_tanh")
    return ew(lambda v: activation_expr(v, activation), t, name="act") if activation else t


def _weight(spec: LinearSpec, args: dict):
    """Declares the weight arguments; returns w(jb, k, lane) as f32, dequantized as read. w8's
    per-channel scale is applied to the sums instead (the epilogue)."""
    from tvm import te

    nb, k, dt = packed_rows(spec.n), spec.k, spec.dtype
    if not spec.quant:
        w = args["w"] = te.placeholder((nb // TILE, k, TILE * LANES), dt, name="w")
        return lambda jb, kk, lane: _at(w, jb, kk, lane)
    if spec.quant == "w8":
        w = args["w"] = te.placeholder((nb // TILE, k, TILE * LANES), "int8", name="w")
        args["w_scale"] = te.placeholder((spec.n,), dt, name="w_scale")
        return lambda jb, kk, lane: _at(w, jb, kk, lane).astype(dt)
    groups = k // spec.group_size
    w = args["w"] = te.placeholder((nb // TILE, k // 2, TILE * LANES), "uint8", name="w")
    scale = args["w_scale"] = te.placeholder((nb // TILE, groups, TILE * LANES), dt, name="w_scale")
    zero = args["w_zero"] = te.placeholder((nb // TILE, groups, TILE * LANES), dt, name="w_zero")

    def dequantized(jb, kk, lane):
        g = kk // spec.group_size
        return (_nibble(w, jb, kk, lane).astype(dt) - _at(zero, jb, g, lane)) * _at(scale, jb, g, lane)
    return dequantized


def _grouped_rows(spec: LinearSpec, h, rows, args):
    """4-bit row by row with the scales and zeros applied per group, not per weight:
    sum_g scale_g * (sum_{k in g} h_k q_k - zero_g * sum_{k in g} h_k). The inner loop is then
    a nibble's extraction, conversion and one multiply-add: decode is bound by this arithmetic
    more than by memory at 4 bits."""
    from tvm import te

    dt, size = spec.dtype, spec.group_size
    groups = spec.k // size
    w, scale, zero = args["w"], args["w_scale"], args["w_zero"]
    r = te.reduce_axis((0, size), name="r")
    part = te.compute((rows, packed_rows(spec.n), groups, LANES), lambda i, jb, g, lane: te.sum(
        h[i, g * size + r] * _nibble(w, jb, g * size + r, lane).astype(dt), axis=r), name="part")
    r = te.reduce_axis((0, size), name="r")
    hsum = te.compute((rows, groups), lambda i, g: te.sum(h[i, g * size + r], axis=r), name="hsum")
    g = te.reduce_axis((0, groups), name="g")
    return te.compute((rows, packed_rows(spec.n), LANES), lambda i, jb, lane: te.sum(
        _at(scale, jb, g, lane) * (part[i, jb, g, lane] - _at(zero, jb, g, lane) * hsum[i, g]), axis=g), name="rows")


def _integer_rows(spec: LinearSpec, h, m, args):
    """The GEMM with int8 activations (`act_block`): h is quantized per block (scale max|h| /
    127), each block's integer dot products go to int32 (`int_dot`), and the sums are scaled
    per block, then per weight group (w8: one group, the output channel's scale):

        rows[i, j] = sum_g scale[j, g] * (sum_{b in g} s_b * dot_b[j] - zero[j, g] * sum_{b in g} s_b * sum(q_b))

    The zero points' term needs only the activations' block sums, computed once for all rows
    of weights."""
    from tvm import te, tirx


    block, k, n, reg = spec.act_block, spec.k, spec.n, spec.register_width
    npad, nblocks = packed_rows(n) * LANES, k // block
    size = spec.group_size if spec.quant == "w4" else k
    groups, per_group = k // size, size // block
    r = te.reduce_axis((0, block), name="r")
    amax = te.compute((m, nblocks), lambda i, b: te.max(te.abs(h[i, b * block + r]), axis=r), name="amax")
    xq = te.compute((m, k), lambda i, kk: te.round(h[i, kk] * tirx.Select(
        amax[i, kk // block] > 0, 127 / amax[i, kk // block], 0.0)).astype("int8"), name="xq")
    r = te.reduce_axis((0, block), name="r")
    xsum = te.compute((m, nblocks), lambda i, b: te.sum(xq[i, b * block + r].astype("int32"), axis=r), name="xsum")

    def scale_of(i, b):
        return amax[i, b] * (1 / 127)

    bb = te.reduce_axis((0, per_group), name="bb")
    zsum = te.compute((m, groups), lambda i, g: te.sum(
        scale_of(i, g * per_group + bb) * xsum[i, g * per_group + bb].astype("float32"), axis=bb), name="zsum")
    rq, c = te.reduce_axis((0, block // 4), name="rq"), te.reduce_axis((0, 4), name="c")
    if spec.quant == "w8":
        signed = int_dot.signed_weights(spec.isa, "w8")
        w = args["w"] = te.placeholder((npad // 64, nblocks, 64 // reg, block // 4, reg, 4),
                                       "int8" if signed else "uint8", name="w")

        def product(i, b, j):
            wv = w[j // 64, b, j % 64 // reg, rq, j % reg, c].astype("int32")
            return xq[i, b * block + rq * 4 + c].astype("int32") * wv
        scale = args["w_scale"] = te.placeholder((n,), spec.dtype, name="w_scale")
        scale_at = lambda j, g: scale[tirx.min(j, n - 1)]  # noqa: E731
        zero_at = lambda j, g: 0.0 if signed else 128.0  # noqa: E731
    else:
        w = args["w"] = te.placeholder((npad // 64, nblocks, 64 // reg, block // 8, reg, 4), "uint8", name="w")
        rq = te.reduce_axis((0, block // 8), name="rq")

        def product(i, b, j):
            wv = w[j // 64, b, j % 64 // reg, rq, j % reg, c]
            at = b * block + rq * 8 + c
            return (xq[i, at].astype("int32") * (wv & tirx.const(15, "uint8")).astype("int32")
                    + xq[i, at + 4].astype("int32") * (wv >> tirx.const(4, "uint8")).astype("int32"))
        scale = args["w_scale"] = te.placeholder((npad // 64, groups, 64), spec.dtype, name="w_scale")
        zero = args["w_zero"] = te.placeholder((npad // 64, groups, 64), spec.dtype, name="w_zero")
        scale_at = lambda j, g: scale[j // 64, g, j % 64]  # noqa: E731
        zero_at = lambda j, g: zero[j // 64, g, j % 64]  # noqa: E731
    dot = te.compute((m, nblocks, npad), lambda i, b, j: te.sum(product(i, b, j), axis=[rq, c]), name="dot")
    bb = te.reduce_axis((0, per_group), name="bb")
    part = te.compute((m, groups, npad), lambda i, g, j: te.sum(
        scale_of(i, g * per_group + bb) * dot[i, g * per_group + bb, j].astype("float32"), axis=bb), name="part")
    g = te.reduce_axis((0, groups), name="g")
    return te.compute((m, npad), lambda i, j: te.sum(
        scale_at(j, g) * (part[i, g, j] - zero_at(j, g) * zsum[i, g]), axis=g), name="int_rows")


def prim_func(spec: LinearSpec, config: dict | None = None):
    """The kernel as a TensorIR function (unscheduled); `config`: knob values (`knobs`)."""
    from tvm import te

    return te.create_prim_func(tensors(spec, config))


def normed(spec: LinearSpec, x, m, args: dict):
    """The norm prologue: h = norm(x) over x's [m, k] rows (x itself without a norm); declares
    the norm's arguments in `args`."""
    from tvm import te

    k, dt = spec.k, spec.dtype
    if not spec.norm:
        return x
    scale = args["norm_scale"] = te.placeholder((k,), dt, name="norm_scale")
    r = te.reduce_axis((0, k), name="r")
    if spec.norm == "rms":
        ss = te.compute((m,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="sumsq")
        h = te.compute((m, k), lambda i, j: x[i, j] * te.rsqrt(ss[i] / k + spec.epsilon) * scale[j],
                       name="normed")
    else:
        shift = args["norm_bias"] = te.placeholder((k,), dt, name="norm_bias")
        s1 = te.compute((m,), lambda i: te.sum(x[i, r], axis=r), name="sum")
        r2 = te.reduce_axis((0, k), name="r2")
        s2 = te.compute((m,), lambda i: te.sum((x[i, r2] - s1[i] / k) * (x[i, r2] - s1[i] / k), axis=r2),
                        name="sqdev")
        h = te.compute((m, k), lambda i, j: (x[i, j] - s1[i] / k) * te.rsqrt(s2[i] / k + spec.epsilon)
                       * scale[j] + shift[j], name="normed")
    return h


def tensors(spec: LinearSpec, config: dict | None = None) -> list:
    """The kernel's arguments as TE tensors, in order, the output last."""
    from tvm import te, tirx

    m = tirx.Var("m", "int64")
    n, k, dt = spec.n, spec.k, spec.dtype
    x = te.placeholder((m, k), dt, name="x")
    args = {"x": x}
    weight = None if spec.act_block else _weight(spec, args)
    h = normed(spec, x, m, args)
    if spec.act_block:
        int_rows = _integer_rows(spec, h, m, args)
        acc = lambda i, jj: int_rows[i, jj]  # noqa: E731
    else:
        acc = _float_rows(spec, h, m, weight, args, _tile(config or {})[0])
    bias = args["bias"] = te.placeholder((n,), dt, name="bias") if spec.bias else None
    res = args["residual"] = te.placeholder((m, spec.out_features), dt, name="residual") \
        if spec.residual else None

    channel_scale = args.get("w_scale") if spec.quant == "w8" and not spec.act_block else None

    def dot(i, j):
        a = acc(i, j) * channel_scale[j] if channel_scale is not None else acc(i, j)
        return a + bias[j] if bias is not None else a

    pre = te.compute((m, n), dot, name="pre")
    out = spec.out_features
    act = _activate(te.compute((m, out), lambda i, j: pre[i, j], name="gate") if spec.gated else pre,
                    spec.activation)

    def epilogue(i, j):
        v = act[i, j] * pre[i, j + out] if spec.gated else act[i, j]
        return v + res[i, j] if res is not None else v

    y = te.compute((m, out), epilogue, name="y")
    return [args[a] for a in spec.arg_names()[:-1]] + [y]


def _float_rows(spec: LinearSpec, h, m, weight, args, rows_per_tile: int):
    """acc(i, j) of the GEMM with f32 activations: register tiles of `rows_per_tile` rows from
    that many rows on (the last one clamped); fewer rows one by one."""
    from tvm import te, tirx

    nb, k = packed_rows(spec.n), spec.k
    R = rows_per_tile
    tiled = m >= R
    nblocks = tirx.if_then_else(tiled, (m + R - 1) // R, 0)
    red = te.reduce_axis((0, k), name="kk")
    if spec.quant == "w4":  # dequantized once per task's 64 features, for all its row blocks
        wdq = te.compute((nb, k, LANES), weight, name="tile")
        weight_of_blocks = lambda jb, kk, lane: wdq[jb, kk, lane]  # noqa: E731
    else:
        weight_of_blocks = weight
    # the leading axis is 1 when tiled, else 0: a loop the tile's dequantization can sit under,
    # so that decode never runs it
    blocks = te.compute((tirx.if_then_else(tiled, 1, 0), nblocks, R, nb, LANES), lambda a, io, ii, jb, lane: te.sum(
        h[tirx.min(io * R + ii, m - 1), red] * weight_of_blocks(jb, red, lane), axis=red), name="blocks")
    few = tirx.if_then_else(tiled, 0, m)
    red = te.reduce_axis((0, k), name="kk")
    if spec.quant == "w4":
        rows = _grouped_rows(spec, h, few, args)
    else:
        rows = te.compute((few, nb, LANES), lambda i, jb, lane: te.sum(h[i, red] * weight(jb, red, lane), axis=red),
                          name="rows")

    def acc(i, jj):
        # the clamps are no-ops that let the schedule's region analysis see the reads in bounds
        return tirx.if_then_else(tiled, blocks[0, tirx.min(i // R, nblocks - 1), i % R, jj // LANES, jj % LANES],
                                 rows[tirx.min(i, few - 1), jj // LANES, jj % LANES])

    return acc


def schedule(spec: LinearSpec, config: dict | None = None):
    """Parallel tiles of 64 features; in each, every row block: the reduction, then a register
    tile of accumulators (rows x vectors of 16 features, unrolled, vectorized). Below a tile's
    rows, the same tasks row by row with 4 x 16 accumulators. The norm prologue is its own stage;
    the epilogue is one stage, rows in parallel, features vectorized. `config`: knob values
    (`knobs`; missing ones take their defaults)."""
    import tvm

    config = {**default_config(spec), **(config or {})}  # callers pass every knob: see `knobs`
    sch = tvm.s_tir.Schedule(prim_func(spec, config))
    if spec.act_block:
        _schedule_integer(sch, spec)
    else:
        _schedule_float(sch, spec, config)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint in EPILOGUE_STAGES:
            sch.compute_inline(block)
    i, j = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(j, [None, LANES])[1])
    sch.parallel(i)
    return sch


def _schedule_integer(sch, spec: LinearSpec):
    """Parallel tasks of 64 output features; in each, every row, and in a row the features in
    register tiles as wide as the vector unit holds (AVX2: 32, twice over): per weight group
    and activation block, the block's int32 dot products by the ISA's intrinsic (unrolled),
    then f32 multiply-adds by the block's and the group's scales. The quantization of the
    activations is a prologue over all rows (a small fraction of the work)."""

    lanes = int_dot.ISAS.get(spec.isa, 8)  # no isa: plain loops, for CPUs without these instructions
    rows = sch.get_sblock("int_rows")
    i, j, g = sch.get_loops(rows)
    jt, jl = sch.split(j, [None, 64])
    sch.reorder(jt, i, g, jl)
    sch.parallel(jt)
    local = sch.cache_write(rows, 0, "local")
    sch.reverse_compute_at(local, i)
    sch.vectorize(sch.get_loops(local)[-1])
    part = sch.get_sblock("part")
    sch.compute_at(part, g)
    sch.set_scope(part, 0, "local")
    if (spec.group_size if spec.quant == "w4" else spec.k) == spec.act_block:  # one block per group:
        # compute_at dropped the unit loop over the group's blocks
        pj = sch.get_loops(part)[-1]
        pb = sch.add_unit_loop(pj)
    else:
        pj, pb = sch.get_loops(part)[-2:]
        sch.reorder(pb, pj)
    ph, pj = sch.split(pj, [None, spec.register_width])  # AVX2: two halves of 32 features per block
    sch.vectorize(pj)
    sch.unroll(ph)
    dot = sch.get_sblock("dot")
    sch.compute_at(dot, ph)
    sch.set_scope(dot, 0, "local")
    dj, rq, c = sch.get_loops(dot)[-3:]
    jv, lane = sch.split(dj, [None, lanes])
    sch.reorder(rq, jv, lane, c)
    init = sch.decompose_reduction(dot, rq)
    sch.vectorize(sch.get_loops(init)[-1])
    if spec.isa:
        sch.tensorize(lane, int_dot.name(spec.isa, spec.quant))
    sch.unroll(jv)
    sch.unroll(rq)
    sch.vectorize(jl)
    sch.decompose_reduction(part, pb)
    sch.decompose_reduction(rows, g)
    for name in ("amax", "xq"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])


def _schedule_float(sch, spec: LinearSpec, config: dict):
    """Prefill: per task, its feature sub-tiles (`cols` vectors) and row blocks in the `order`
    the config gives, the reduction over each register tile. Decode: per task and row, the
    reduction (unrolled `unroll` times) over the task's 4 x 16 accumulators."""
    _, cols = _tile(config)
    block = sch.get_sblock("blocks")
    any_, io, ii, jb, lane, red = sch.get_loops(block)
    jo, jm, ji = sch.split(jb, [None, TILE // cols, cols])
    outer = [io, jm] if config["order"] == "rows" else [jm, io]
    sch.reorder(jo, any_, *outer, red, ii, ji, lane)
    sch.parallel(jo)
    if spec.quant == "w4":
        tile = sch.get_sblock("tile")
        sch.compute_at(tile, any_)
        sch.vectorize(sch.get_loops(tile)[-1])
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, outer[1])
    sch.vectorize(sch.get_loops(local)[-1])
    sch.unroll(ii)
    sch.unroll(ji)
    sch.vectorize(lane)
    sch.decompose_reduction(block, red)

    block = sch.get_sblock("rows")
    i, jb, lane, red = sch.get_loops(block)
    jo, ji = sch.split(jb, [None, TILE])
    if config.get("unroll", 1) > 1:
        red, inner = sch.split(red, [None, config["unroll"]])
        sch.reorder(jo, i, red, inner, ji, lane)
        sch.unroll(inner)
    else:
        sch.reorder(jo, i, red, ji, lane)
    sch.parallel(jo)
    sch.vectorize(lane)
    sch.unroll(ji)
    if spec.quant == "w4":  # per group: the partial sums of TILE x 16 features, in registers
        part = sch.get_sblock("part")
        sch.compute_at(part, red)
        sch.set_scope(part, 0, "local")
        *_, pji, plane, pr = sch.get_loops(part)
        sch.reorder(pr, pji, plane)
        sch.unroll(pji)
        sch.vectorize(plane)
        sch.decompose_reduction(part, _nibble_pairs(sch, spec, pr))
    sch.decompose_reduction(block, red)


def _nibble_pairs(sch, spec: LinearSpec, red):
    """4-bit weights: the reduction steps over input features two at a time, unrolled, so the
    byte holding both is loaded once and the nibbles come out by constant shifts. Returns the
    outer reduction loop."""
    if spec.quant != "w4":
        return red
    outer, inner = sch.split(red, [None, 2])
    sch.unroll(inner)
    return outer


def build(spec: LinearSpec, target: dict, config: dict | None = None):
    import tvm

    return tvm.compile(schedule(spec, config).mod, target=tvm.target.Target(target))
