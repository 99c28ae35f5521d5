"""Elementwise and data-movement ops as TVM kernels: one TE definition per op, read off a table.

These are the small ops a compiled graph keeps besides its fused kernels: the embedding gather,
and the per-step mask and rotary-table construction (range, compare, and, where, cast, cos, sin,
concat, expand, gather_nd, a reduction such as LongRoPE's largest position, ...); the standalone norms (`norm.py`) are lowered through the same
table. Shapes are symbolic: each named dim (batch, seq, past) becomes
a TIR variable bound from the buffers at run time, and each `dims` value is evaluated the same way.
Their schedules are plain: small ops run serial, since a parallel launch costs more than them.
"""

from __future__ import annotations

from llmc.ir.symbolic import Sym
from llmc.ops.nn import reduction_axes

from .norm import NORMS


class Dims:
    """Named dims -> TIR variables, and IR dims -> TIR expressions."""

    def __init__(self):
        self.vars = {}

    def var(self, name):
        from tvm import tirx

        if name not in self.vars:
            self.vars[name] = tirx.Var(name.replace(".", "_").replace(" ", "_"), "int64")
        return self.vars[name]

    def expr(self, d):
        from tvm import tirx

        if isinstance(d, int):
            return tirx.const(d, "int64")
        total = tirx.const(0, "int64")
        for monomial, coeff in d.terms.items():
            term = tirx.const(coeff, "int64")
            for atom in monomial:
                term = term * self.var(atom)
            total = total + term
        return total

    def shape(self, dims):
        return tuple(self.expr(d) for d in dims)


def _broadcast_index(t, out_index):
    """Index into tensor `t` for an output index, numpy broadcasting (right-aligned, size-1)."""
    rank = len(t.shape)
    idx = out_index[len(out_index) - rank:] if rank else ()
    return [0 if _is_one(dim) else i for dim, i in zip(t.shape, idx)]


def _is_one(dim) -> bool:
    return getattr(dim, "value", None) == 1


def _elementwise(fn):
    def make(node, ins, out_shape, dims):
        from tvm import te

        def body(*i):
            return fn(*(t(*_broadcast_index(t, i)) for t in ins), node=node)
        return te.compute(out_shape, body, name=node.op)
    return make


def _cast(x, node):
    return x.astype(node.attrs["to"].numpy().name)


def _where(c, x, y, node):
    from tvm import tirx

    return tirx.Select(c, x, y)  # both sides are in bounds: the eager select is fine


def _tvm():
    from tvm import te, tirx
    return te, tirx


def _activation(x, node):
    """An activation the GEMM epilogues also apply (`linear.activation_expr`), standalone where
    no GEMM took it."""
    from .linear import activation_expr

    return activation_expr(x, "gelu_tanh" if node.op == "gelu" and node.attrs["approximate"] == "tanh" else node.op)


UNARY = {"gelu": _activation, "silu": _activation, "relu": _activation, "neg": lambda x, node: -x, "cos": lambda x, node: _tvm()[0].cos(x),
         "sin": lambda x, node: _tvm()[0].sin(x), "exp": lambda x, node: _tvm()[0].exp(x),
         "sqrt": lambda x, node: _tvm()[0].sqrt(x), "tanh": lambda x, node: _tvm()[0].tanh(x),
         "sigmoid": lambda x, node: _tvm()[0].sigmoid(x), "reciprocal": lambda x, node: 1 / x,
         "not": lambda x, node: _tvm()[1].Not(x), "cast": _cast}
BINARY = {"add": lambda a, b, node: a + b, "sub": lambda a, b, node: a - b, "mul": lambda a, b, node: a * b,
          "max": lambda a, b, node: _tvm()[0].max(a, b), "min": lambda a, b, node: _tvm()[0].min(a, b),
          "equal": lambda a, b, node: a == b, "less": lambda a, b, node: a < b,
          "less_equal": lambda a, b, node: a <= b, "greater": lambda a, b, node: a > b,
          "greater_equal": lambda a, b, node: a >= b,
          "and": lambda a, b, node: _tvm()[1].And(a, b), "or": lambda a, b, node: _tvm()[1].Or(a, b)}


def _view(node, ins, out_shape, dims):
    """reshape/squeeze/unsqueeze/flatten: the same elements, a new shape (row-major)."""
    from tvm import te

    (x,) = ins[:1]

    def body(*i):
        flat = 0
        for dim, idx in zip(out_shape, i):
            flat = flat * dim + idx
        index = []
        for dim in reversed(x.shape):
            index.append(flat % dim)
            flat = flat // dim
        return x(*reversed(index))
    return te.compute(out_shape, body, name=node.op)


def _concat(node, ins, out_shape, dims):
    from tvm import te, tirx

    axis = node.attrs["axis"] % len(out_shape)
    offsets, start = [], 0
    for t in ins:
        offsets.append(start)
        start = start + t.shape[axis]

    def body(*i):
        value = None
        for t, off in zip(ins, offsets):
            idx = list(_broadcast_index(t, i))
            idx[axis] = i[axis] - off
            # lazily: the other inputs must not be read out of their bounds
            value = t(*idx) if value is None else tirx.if_then_else(i[axis] >= off, t(*idx), value)
        return value
    return te.compute(out_shape, body, name="concat")


def _expand(node, ins, out_shape, dims):
    from tvm import te

    x = ins[0]
    return te.compute(out_shape, lambda *i: x(*_broadcast_index(x, i)), name="expand")


def _gather(node, ins, out_shape, dims):
    """x.take(indices, axis) with negative indices counted from the end."""
    from tvm import te, tirx

    x, idx = ins
    axis = node.attrs["axis"] % len(x.shape)
    r = len(idx.shape)

    def body(*i):
        j = idx(*i[axis:axis + r]).astype("int64")
        j = tirx.Select(j < 0, j + x.shape[axis], j)
        return x(*(i[:axis] + (j,) + i[axis + r:]))
    return te.compute(out_shape, body, name="gather")


def _gather_nd(node, ins, out_shape, dims):
    from tvm import te

    x, idx = ins
    if node.attrs["batch_dims"]:
        raise NotImplementedError("gather_nd with batch_dims")
    k = int(idx.shape[-1])
    lead = len(idx.shape) - 1

    def body(*i):
        picks = tuple(idx(*(i[:lead] + (c,))).astype("int64") for c in range(k))
        return x(*(picks + i[lead:]))
    return te.compute(out_shape, body, name="gather_nd")


def _transpose(node, ins, out_shape, dims):
    from tvm import te

    (x,) = ins
    perm = node.attrs["perm"] or tuple(reversed(range(len(x.shape))))
    inverse = [perm.index(a) for a in range(len(perm))]
    return te.compute(out_shape, lambda *i: x(*(i[inverse[a]] for a in range(len(perm)))), name="transpose")


def _slice(node, ins, out_shape, dims):
    """Constant starts and steps (an end is implied by the output's shape)."""
    from tvm import te, tirx

    x = ins[0]
    starts, _, axes, steps = (v.sym if v is not None else None for v in (list(node.inputs[1:]) + [None] * 3)[:4])
    if starts is None or axes is None or steps is None:
        raise NotImplementedError(f"{node.name}: slice with starts, axes or steps not known at compile time")
    begin, stride = [0] * len(x.shape), [1] * len(x.shape)
    for start, axis, step in zip(starts, axes, steps):
        axis = axis % len(x.shape)
        size = node.inputs[0].shape[axis]
        if isinstance(start, int) and start < 0:  # from the end, clamped to the front (numpy)
            start = start + size
            begin[axis] = tirx.max(dims.expr(start), tirx.const(0, "int64")) if isinstance(start, Sym) else max(start, 0)
        else:
            begin[axis] = dims.expr(start)
        stride[axis] = step
    return te.compute(out_shape, lambda *i: x(*(b + j * st for j, b, st in zip(i, begin, stride))), name="slice")


def _range(node, ins, out_shape, dims):
    from tvm import te

    start, _, delta = ins
    return te.compute(out_shape, lambda i: start() + i.astype(start.dtype) * delta(), name="range")


def _dims(node, ins, out_shape, dims):
    from tvm import te, tirx

    values = [dims.expr(v) for v in node.attrs["values"]]

    def body(i):
        out = values[-1]
        for n in range(len(values) - 2, -1, -1):
            out = tirx.Select(i == n, values[n], out)
        return out
    return te.compute(out_shape, body, name="dims")


def _split(node, ins, out_shapes, dims):
    """Several outputs: each a slice of the input along the axis."""
    from tvm import te

    (x,) = ins
    axis = node.attrs["axis"] % len(x.shape)

    def part(off):
        return lambda *i: x(*(i[:axis] + (i[axis] + off,) + i[axis + 1:]))

    outs, off = [], 0
    for n, shape in enumerate(out_shapes):
        outs.append(te.compute(shape, part(off), name=f"part{n}"))
        off = off + shape[axis]
    return outs


def _rotary(node, ins, out_shape, dims):
    """A rotary embedding no cache kernel took (`ops.transformer.rotary`): the first rotary_dim
    features of each head rotate, the rest pass through."""
    from tvm import te, tirx

    x, cos, sin = ins
    d = int(x.shape[-1])
    rd = node.attrs["rotary_dim"] or d
    half = rd // 2

    def body(*i):
        *lead, f = i
        turn = tirx.min(f, rd - 1)  # the tables' feature (read only where f < rd)
        partner = tirx.if_then_else(f < half, -x(*lead, tirx.min(f + half, d - 1)), x(*lead, tirx.max(f - half, 0)))
        c, s_ = (t(*_broadcast_index(t, [*lead, turn])) for t in (cos, sin))
        return tirx.if_then_else(f < rd, x(*i) * c + partner * s_, x(*i))
    return te.compute(out_shape, body, name="rotary")


def _reduce(node, ins, out_shape, dims):
    """reduce_max/min/sum/mean over constant axes: LongRoPE's largest position, say."""
    from tvm import te

    (x,) = ins
    axes, keep = reduction_axes(len(x.shape), node.attrs["axes"]), node.attrs["keepdims"]
    rs = [te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes]

    def at(i):  # output coordinates -> the input's, the reduced axes' from rs
        index, r, k = [], iter(rs), 0
        for a in range(len(x.shape)):
            reduced = a in axes
            index.append(next(r) if reduced else i[k])
            k += 1 if keep or not reduced else 0
        return index
    combine = {"reduce_max": te.max, "reduce_min": te.min}.get(node.op, te.sum)
    y = te.compute(out_shape, lambda *i: combine(x(*at(i)), axis=rs), name="reduce")
    if node.op != "reduce_mean":
        return y
    count = 1
    for a in axes:
        count = count * x.shape[a]
    return te.compute(out_shape, lambda *i: y(*i) / count.astype(x.dtype), name="mean")


REDUCTIONS = ("reduce_max", "reduce_min", "reduce_sum", "reduce_mean")
LOWERINGS = {**{op: _elementwise(fn) for op, fn in UNARY.items()},
             **{op: _elementwise(fn) for op, fn in BINARY.items()},
             "where": _elementwise(_where),
             **{op: _view for op in ("reshape", "squeeze", "unsqueeze", "flatten", "identity")},
             "concat": _concat, "expand": _expand, "transpose": _transpose, "gather": _gather, "gather_nd": _gather_nd,
             "range": _range, "dims": _dims, "split": _split, "slice": _slice, **NORMS,
             **{op: _reduce for op in REDUCTIONS}, "rotary": _rotary}
MULTI_OUTPUT = {"split", "add_norm"}


def prim_func(node):
    """A PrimFunc for one IR node. Arguments: its inputs (params included) in IR order, its
    output, then the named dims it uses (int64 scalars, sorted by name: `dim_names(node)`).
    Shape-only inputs (reshape's target, expand's shape) are not passed: the output type holds
    the shape."""
    from tvm import te

    if node.op not in LOWERINGS:
        raise NotImplementedError(f"no TVM lowering for op {node.op!r}")
    dims = Dims()
    ins = []
    for pos, v in enumerate(node.inputs):
        if v is None or (node.op in ("reshape", "expand") and pos == 1):
            continue
        ins.append(te.placeholder(dims.shape(v.shape), v.dtype.numpy().name, name=f"in{pos}"))
    if node.op in MULTI_OUTPUT:
        outs = LOWERINGS[node.op](node, ins, [dims.shape(v.shape) for v in node.outputs], dims)
    else:
        out = node.outputs[0]
        y = LOWERINGS[node.op](node, ins, dims.shape(out.shape), dims)
        if y.dtype != out.dtype.numpy().name:
            y = te.compute(y.shape, lambda *i: y(*i).astype(out.dtype.numpy().name), name="out")
        outs = [y]
    return te.create_prim_func(ins + outs + [dims.vars[n] for n in sorted(dims.vars)])


def dim_names(node) -> list[str]:
    """The named dims a node's kernel takes as trailing scalar arguments."""
    names = set()
    for v in list(node.inputs) + list(node.outputs):
        if v is not None:
            names.update(a for d in v.shape if isinstance(d, Sym) for a in d.atoms)
    if node.op == "dims":
        names.update(a for d in node.attrs["values"] if isinstance(d, Sym) for a in d.atoms)
    return sorted(names)


def build(node, target: dict):
    import tvm

    return tvm.compile(tvm.IRModule({"main": prim_func(node)}), target=tvm.target.Target(target))

