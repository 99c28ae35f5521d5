"""Elementwise and data-movement ops as Triton kernels, generated from one template.

Each kernel computes the elements of its output(s) from a flat index: the index is split into
the output's coordinates, the op maps them to the coordinates its inputs are read at (numpy
broadcasting, concat offsets, gathered indices, ...), and the value is an expression over those
loads, written by a table of one entry per op (the same table of meanings as the TVM backend's
`injective.py`). Shapes are symbolic: batch and seq come as arguments, past and total from
device memory (D = [past, total]), so the kernel of a step captured in a CUDA graph reads the
current lengths. Sizes are computed in int64.
"""

from __future__ import annotations

from llmc.ir.symbolic import Sym
from llmc.ops.nn import reduction_axes
from llmc.runtime.dims import parse

BLOCK = 1024

TL_TYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16", "int64": "tl.int64",
            "int32": "tl.int32", "int8": "tl.int8", "uint8": "tl.uint8", "bool": "tl.int1"}


def dim_code(d) -> str:
    """An IR dim as a Triton expression over the kernel's dims."""
    if isinstance(d, int):
        return str(d)
    terms = [" * ".join([str(c)] + [_atom_code(parse(a)) for a in monomial]) for monomial, c in d.terms.items()]
    return "(" + " + ".join(terms or ["0"]) + ")"


def _atom_code(tree) -> str:
    if isinstance(tree, (int, str)):
        return str(tree)
    op, a, b = tree
    if op in ("min", "max"):
        return f"tl.{op}imum({_atom_code(a)}, {_atom_code(b)})"
    return f"({_atom_code(a)} {op} {_atom_code(b)})"


class Writer:
    """The body of one kernel: loads of the inputs at index expressions, under the mask."""

    def __init__(self, node):
        self.node = node
        self.inputs = [v for pos, v in enumerate(node.inputs) if v is not None and not _shape_only(node, pos)]

    def load(self, k: int, index: list[str]) -> str:
        """tl.load of input k at coordinates `index` (expressions)."""
        shape = self.inputs[k].shape
        flat = "0"
        for d, i in zip(shape, index):
            flat = f"({flat}) * {dim_code(d)} + ({i})"
        return f"tl.load(IN{k} + ({flat}) + 0 * f, mask=m, other=0)"  # + 0 * f: a block, even for a scalar

    def broadcast(self, k: int, out_index: list[str]) -> str:
        shape = self.inputs[k].shape
        idx = out_index[len(out_index) - len(shape):] if shape else []
        return self.load(k, ["0" if d == 1 else i for d, i in zip(shape, idx)])


def _shape_only(node, pos) -> bool:
    return node.op in ("reshape", "expand") and pos == 1


UNARY = {"gelu": None, "neg": "-({0})", "cos": "tl.cos({0})", "sin": "tl.sin({0})", "exp": "tl.exp({0})",
         "sqrt": "tl.sqrt({0})", "tanh": "(1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * {0}, 40.0)) + 1.0))",
         "sigmoid": "(1.0 / (1.0 + tl.exp(-({0}))))", "silu": "({0} / (1.0 + tl.exp(-({0}))))",
         "relu": "tl.maximum({0}, 0.0)", "reciprocal": "(1.0 / {0})", "not": "({0} == 0)",
         "cast": "{0}"}
BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "max": "tl.maximum({0}, {1})",
          "min": "tl.minimum({0}, {1})", "equal": "({0} == {1})", "less": "({0} < {1})",
          "less_equal": "({0} <= {1})", "greater": "({0} > {1})", "greater_equal": "({0} >= {1})",
          "and": "(({0} != 0) & ({1} != 0))", "or": "(({0} != 0) | ({1} != 0))"}
GELU = {"none": "(0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476)))",
        "tanh": "(0.5 * {0} * (2.0 - 2.0 / (tl.exp(tl.minimum(1.5957691216057308 * ({0} + 0.044715 * {0} * {0} * {0}), 40.0)) + 1.0)))"}


def _elementwise(w: Writer, i: list[str], out) -> str:
    node = w.node
    args = [w.broadcast(k, i) for k in range(len(w.inputs))]
    if node.op == "gelu":
        x = f"{args[0]}.to(tl.float32)"
        return GELU[node.attrs["approximate"]].format(x)
    if node.op == "where":
        return f"tl.where({args[0]} != 0, {args[1]}, {args[2]})"
    if node.op in ("cos", "sin", "exp", "sqrt", "tanh", "sigmoid", "silu"):
        args = [f"{args[0]}.to(tl.float32)"]
    if node.op == "cast" and node.attrs["to"].numpy().name == "bool":
        return f"({args[0]} != 0)"
    return (UNARY.get(node.op) or BINARY[node.op]).format(*args)


def _view(w: Writer, i: list[str], out) -> str:
    flat = "0"
    for d, idx in zip(out.shape, i):
        flat = f"({flat}) * {dim_code(d)} + ({idx})"
    shape, index = w.inputs[0].shape, []
    for d in reversed(shape):
        index.append(f"(({flat}) % {dim_code(d)})")
        flat = f"(({flat}) // {dim_code(d)})"
    return w.load(0, list(reversed(index)))


def _concat(w: Writer, i: list[str], out) -> str:
    axis = w.node.attrs["axis"] % len(out.shape)
    value, offset = None, "0"
    for k, v in enumerate(w.inputs):
        idx = ["0" if d == 1 else x for d, x in zip(v.shape, i)]
        idx[axis] = f"({i[axis]} - {offset})"
        end = f"({offset} + {dim_code(v.shape[axis])})"
        inside = f"(({i[axis]} >= {offset}) & ({i[axis]} < {end}))"
        load = w.load(k, idx).replace("mask=m", f"mask=m & {inside}")  # no read outside an input
        value = load if value is None else f"tl.where({inside}, {load}, {value})"
        offset = end
    return value


def _expand(w: Writer, i: list[str], out) -> str:
    return w.broadcast(0, i)


def _gather(w: Writer, i: list[str], out) -> str:
    x, idx = w.inputs
    axis = w.node.attrs["axis"] % len(x.shape)
    r = len(idx.shape)
    j = f"{w.load(1, i[axis:axis + r])}.to(tl.int64)"
    j = f"tl.where({j} < 0, {j} + {dim_code(x.shape[axis])}, {j})"
    return w.load(0, i[:axis] + [j] + i[axis + r:])


def _gather_nd(w: Writer, i: list[str], out) -> str:
    x, idx = w.inputs
    if w.node.attrs["batch_dims"]:
        raise NotImplementedError("gather_nd with batch_dims")
    k = idx.shape[-1]
    lead = len(idx.shape) - 1
    picks = [f"{w.load(1, i[:lead] + [str(c)])}.to(tl.int64)" for c in range(k)]
    return w.load(0, picks + i[lead:])


def _transpose(w: Writer, i: list[str], out) -> str:
    perm = w.node.attrs["perm"] or tuple(reversed(range(len(out.shape))))
    return w.load(0, [i[perm.index(a)] for a in range(len(perm))])


def _slice(w: Writer, i: list[str], out) -> str:
    node = w.node
    x = node.inputs[0]
    starts, _, axes, steps = (v.sym if v is not None else None for v in (list(node.inputs[1:]) + [None] * 3)[:4])
    if starts is None or axes is None or steps is None:
        raise NotImplementedError(f"{node.name}: slice with starts, axes or steps not known at compile time")
    begin, stride = ["0"] * len(x.shape), [1] * len(x.shape)
    for start, axis, step in zip(starts, axes, steps):
        axis = axis % len(x.shape)
        if isinstance(start, int) and start < 0:
            begin[axis] = f"tl.maximum({dim_code(x.shape[axis])} + {start}, 0)"
        else:
            begin[axis] = dim_code(start if isinstance(start, (int, Sym)) else int(start))
        stride[axis] = step
    return w.load(0, [f"({b} + ({j}) * {st})" for j, b, st in zip(i, begin, stride)])


def _rotary(w: Writer, i: list[str], out) -> str:
    """A rotary embedding no cache kernel took: the first rotary_dim features of each head
    rotate, the rest pass through (reads masked to the features each side needs)."""
    d = w.inputs[0].shape[-1]
    rd = w.node.attrs["rotary_dim"] or d
    half, *lead, f = rd // 2, *i
    x = w.load(0, i)
    lo = w.load(0, [*lead, f"({f} + {half})"]).replace("mask=m", f"mask=m & ({f} < {half})")
    hi = w.load(0, [*lead, f"({f} - {half})"]).replace("mask=m", f"mask=m & ({f} >= {half}) & ({f} < {rd})")
    turn = f"tl.minimum({f}, {rd - 1})"
    cos, sin = (w.broadcast(k, [*lead, turn]) for k in (1, 2))
    return f"tl.where({f} < {rd}, {x} * {cos} + tl.where({f} < {half}, -{lo}, {hi}) * {sin}, {x})"


def _range(w: Writer, i: list[str], out) -> str:
    return f"({w.load(0, [])} + {i[0]} * {w.load(2, [])})"


def _dims(w: Writer, i: list[str], out) -> str:
    values = [dim_code(v) for v in w.node.attrs["values"]]
    expr = f"({values[-1]})"
    for n in range(len(values) - 2, -1, -1):
        expr = f"tl.where({i[0]} == {n}, {values[n]}, {expr})"
    return f"(({expr}) + {i[0]} * 0)"


COMBINE = {"reduce_max": "tl.maximum({0}, {1})", "reduce_min": "tl.minimum({0}, {1})",
           "reduce_sum": "({0} + {1})", "reduce_mean": "({0} + {1})"}


def _reduce(w: Writer, i: list[str], out) -> list[str]:
    """Lines leaving in `acc` the reduction of the input's elements at output coordinates i: a
    loop over the reduced axes' flat index (from the first element: any dtype, any op)."""
    node, x = w.node, w.inputs[0]
    axes, keep = reduction_axes(len(x.shape), node.attrs["axes"]), node.attrs["keepdims"]
    count = numel([x.shape[a] for a in axes])
    outer = [c for a, c in enumerate(i) if a not in axes] if keep else list(i)  # the kept axes' coordinates

    def index(r):  # the input's coordinates at flat index r of the reduced axes
        coords, rest = {}, r
        for a in reversed(axes):
            coords[a] = f"(({rest}) % {dim_code(x.shape[a])})"
            rest = f"(({rest}) // {dim_code(x.shape[a])})"
        kept = iter(outer)
        return [coords[a] if a in axes else next(kept) for a in range(len(x.shape))]
    first, rest = index("0"), index("r")
    lines = [f"    acc = {w.load(0, first)}", f"    for r in range(1, {count}):",
             f"        acc = {COMBINE[node.op].format('acc', w.load(0, rest))}"]
    if node.op == "reduce_mean":
        lines.append(f"    acc = acc / ({count})")
    return lines


LOWERINGS = {**{op: _elementwise for op in (*UNARY, *BINARY, "where")},
             **{op: _view for op in ("reshape", "squeeze", "unsqueeze", "flatten", "identity")},
             "concat": _concat, "expand": _expand, "transpose": _transpose, "gather": _gather,
             "gather_nd": _gather_nd, "range": _range, "dims": _dims, "slice": _slice, "split": None,
             "rotary": _rotary,
             **{op: None for op in COMBINE}}


def _coordinates(out, name="f") -> tuple[list[str], list[str]]:
    """Lines splitting the flat index into the output's coordinates i0.. (row-major)."""
    lines, index, rest = [], [], name
    for a in range(len(out.shape) - 1, -1, -1):
        lines.append(f"    i{a} = {rest} % {dim_code(out.shape[a])}")
        index.append(f"i{a}")
        rest_next = f"r{a}"
        lines.append(f"    {rest_next} = {rest} // {dim_code(out.shape[a])}")
        rest = rest_next
    return lines, list(reversed(index))


def numel(shape) -> str:
    out = "1"
    for d in shape:
        out = f"{out} * {dim_code(d)}"
    return out


def source(node, name: str) -> str:
    """The Triton source of `name`, the kernel of one node: arguments IN0.., OUT0.., D, batch,
    seq, BLOCK; grid (cdiv(largest output, BLOCK),)."""
    if node.op not in LOWERINGS:
        raise NotImplementedError(f"no Triton kernel for op {node.op!r}")
    w = Writer(node)
    outs = node.outputs
    params = [f"IN{k}" for k in range(len(w.inputs))] + [f"OUT{k}" for k in range(len(outs))]
    lines = [f"def {name}({', '.join(params)}, D, batch, seq, BLOCK: tl.constexpr):",
             "    past = tl.load(D).to(tl.int64)", "    total = tl.load(D + 1).to(tl.int64)",
             "    batch = batch.to(tl.int64)", "    seq = seq.to(tl.int64)",
             "    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)"]
    if node.op == "split":
        axis = node.attrs["axis"] % len(outs[0].shape)
        offset = "0"
        for k, out in enumerate(outs):
            coords, i = _coordinates(out)
            lines += coords + [f"    m = f < {numel(out.shape)}"]
            idx = list(i)
            idx[axis] = f"({i[axis]} + {offset})"
            lines.append(f"    tl.store(OUT{k} + f, {w.load(0, idx)}, mask=m)")
            offset = f"({offset} + {dim_code(out.shape[axis])})"
    elif node.op in COMBINE:
        (out,) = outs
        coords, i = _coordinates(out)
        lines += coords + [f"    m = f < {numel(out.shape)}"] + _reduce(w, i, out) + \
            [f"    tl.store(OUT0 + f, acc.to({TL_TYPES[out.dtype.numpy().name]}), mask=m)"]
    else:
        (out,) = outs
        coords, i = _coordinates(out)
        value = LOWERINGS[node.op](w, i, out)
        lines += coords + [f"    m = f < {numel(out.shape)}",
                           f"    tl.store(OUT0 + f, ({value}).to({TL_TYPES[out.dtype.numpy().name]}), mask=m)"]
    return "\n".join(["@triton.jit"] + lines) + "\n"


def grid_shape(node):
    """The shape whose elements the grid covers: the output's, a split's input's."""
    return node.inputs[0].shape if node.op == "split" else node.outputs[0].shape
