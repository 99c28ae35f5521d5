"""Canonical forms, so that one recognition pattern covers the spellings exporters produce.

- division becomes multiplication (by a folded constant, or by `reciprocal`);
- a `MatMul` whose inner dim is 1 (an outer product) becomes a broadcast `mul`, and a batched
  one written as a 3-D `bmm` between reshapes (torch's decomposition of a 4-D matmul) is one
  4-D `MatMul` again;
- `MatMul` by a constant 2-D weight becomes `linear` with the weight transposed once, at compile
  time, to [out_features, in_features], and a following bias `Add` joins it;
- a fused QKV interleaved per head (GPT-NeoX) is reordered to [q | k | v] blocks;
- a `linear` wrapped in reshapes that only flatten and restore the leading dims loses them (the
  flattened input may feed other GEMMs too: torch writes one flatten per projection);
- scalar factors move below reshapes and transposes (where attention absorbs them), merge,
  and vanish when they are 1;
- a constant range of a linear's output features becomes a linear over those weight rows
  (Phi-3's slices of its fused projections), and empty parts of a concat disappear;
- reshapes that change nothing and one-input concats disappear, transposes of transposes merge, and the reshape /
  transpose / reshape chain that swaps the last two axes becomes one transpose.
"""

from __future__ import annotations

import numpy as np

from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

X, Y, W, B, S, S2 = Var("x"), Var("y"), Const("w"), Const("b"), Var("s"), Var("s2")


def _float(v) -> str | None:
    return None if v.dtype.is_float else "not a float tensor"


def _reciprocal(m, b):
    return b.emit("reciprocal", [m["y"]])


def _div_by_const(m, b):
    c = m.data("c")
    return b.emit("mul", [m["x"], b.param((1 / c.astype(np.float64)).astype(c.dtype), "inv")])


def _divide(m, b):
    return b.emit("mul", [m["x"], b.emit("reciprocal", [m["y"]])])


def _swap_fits(m) -> str | None:
    """reshape(transpose(reshape(x[b,h,t,d], [b*h,t,d]), (0,2,1)), [b,h,d,t]) swaps x's last two
    axes (the dynamo exporter's spelling of k.transpose(-1, -2))."""
    x, inner, out = m["x"], m.nodes["inner"].outputs[0], m.nodes["outer"].outputs[0]
    if x.type.rank != 4 or inner.type.rank != 3 or inner.shape[1:] != x.shape[2:]:
        return f"{inner.name} does not merge the two leading axes of {x.name}"
    if out.shape != x.shape[:2] + (x.shape[3], x.shape[2]):
        return f"{out.name} is not {x.name} with its last two axes swapped"
    return None


def _swap_last_two(m, b):
    return b.emit("transpose", [m["x"]], perm=(0, 1, 3, 2))


def _scalar(data) -> str | None:
    return None if data.size == 1 else "not a scalar"


def _push_scale(m, b):
    """view(x * c) -> view(x) * c: a scalar factor moves below reshapes and transposes, where
    attention recognition absorbs it into its scale."""
    view = m.nodes["view"]
    moved = b.emit(view.op, [m["x"]] + view.inputs[1:], **view.attrs)
    return b.emit("mul", [moved, m["c"]])


def _keeps_shape(m) -> str | None:
    node = m.nodes["mul"]
    return None if node.outputs[0].type == m["x"].type else "the constant broadcasts"


def _scales(m, b):
    c1, c2 = m.data("c1"), m.data("c2")
    return b.emit("mul", [m["x"], b.param((c1.reshape(()) * c2.reshape(())).astype(c1.dtype), "scale")])


def _interleaved_fits(m) -> str | None:
    split, heads_view = m.nodes["split"], m.nodes["view"].outputs[0]
    if len(split.outputs) != 3 or split.attrs["axis"] not in (-1, 3):
        return f"{split.name} does not cut the heads into q, k, v"
    sizes = {o.shape[-1] for o in split.outputs}
    h, width = heads_view.shape[2], heads_view.shape[3]
    if len(sizes) != 1 or not isinstance(h, int) or width != 3 * sizes.pop():
        return "q, k and v are not equal thirds of each head"
    if heads_view.shape[-2:] != (h, width) or heads_view.shape[:2] != m["x"].shape[:2]:
        return f"{heads_view.name} is not [batch, seq, heads, 3 * head_dim]"
    return None


def _deinterleave(m, b):
    """linear -> [b, s, heads, 3*d] -> transpose -> split into q, k, v (GPT-NeoX) becomes one
    linear whose weight rows are reordered once to [q heads | k heads | v heads], split, and
    each part viewed as heads: the layout every other family has."""
    lin, heads_view = m.nodes["lin"], m.nodes["view"].outputs[0]
    bsz, seq, h, width = heads_view.shape
    d = width // 3
    rows = [hh * width + j * d + dd for j in range(3) for hh in range(h) for dd in range(d)]
    w = b.param(m.data("w")[rows], f"{m['w'].name}.qkv")
    inputs = [m["x"], w]
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        inputs.append(b.param(b.graph.const_value(lin.inputs[2])[rows], "qkv_bias"))
    y = b.emit("linear", inputs)
    parts = b.emit_multi("split", [y], axis=-1, sizes=(h * d,) * 3, num_outputs=3)
    target = b.emit("dims", [], values=(bsz, seq, h, d))
    return [b.emit("transpose", [b.emit("reshape", [p, target])], perm=(0, 2, 1, 3)) for p in parts]


def _third_fits(m) -> str | None:
    heads_view, part = m.nodes["view"].outputs[0], m.nodes["slice"].outputs[0]
    h, width = heads_view.shape[2], heads_view.shape[3]
    d = part.shape[-1]
    start, end, axis, step = (m[n].sym for n in ("st", "en", "ax", "sp"))
    if not isinstance(h, int) or not isinstance(width, int) or width != 3 * d:
        return "the slice is not a third of each head"
    if axis not in ((-1,), (3,)) or step != (1,) or start is None or start[0] not in (0, d, 2 * d) \
            or end is None or end[0] - start[0] != d:
        return "the slice is not the q, k or v third of the last axis"
    return None


def _deinterleave_third(m, b):
    """One third (q, k or v) of GPT-NeoX's per-head interleaved projection, as its own linear
    over the matching weight rows; fuse_qkv merges the three again, in blocks."""
    lin, heads_view = m.nodes["lin"], m.nodes["view"].outputs[0]
    bsz, seq, h, width = heads_view.shape
    d, j = width // 3, m["st"].sym[0] // (width // 3)
    rows = [hh * width + j * d + dd for hh in range(h) for dd in range(d)]
    inputs = [m["x"], b.param(m.data("w")[rows], f"{m['w'].name}.part{j}")]
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        inputs.append(b.param(b.graph.const_value(lin.inputs[2])[rows], "bias_part"))
    y = b.emit("linear", inputs)
    return b.emit("transpose", [b.emit("reshape", [y, b.emit("dims", [], values=(bsz, seq, h, d))])],
                  perm=(0, 2, 1, 3))


def _inner_one(m) -> str | None:
    a, b = m["x"], m["y"]
    if a.type.rank < 2 or b.type.rank < 2 or a.shape[-1] != 1 or b.shape[-2] != 1:
        return "the inner dim is not 1"
    return None


def _outer_product(m, b):
    """a[..., m, 1] @ b[..., 1, n] is the broadcast product a * b: the TorchScript exporter's
    rotary angles (`inv_freq @ positions`), which then fold like any elementwise op."""
    return b.emit("mul", [m["x"], m["y"]])


def _batched_fits(m) -> str | None:
    a, b, out = m["x"], m["y"], m.nodes["out"].outputs[0]
    flat = [m.nodes[n].outputs[0] for n in ("fa", "fb")]
    if a.type.rank < 3 or a.type.rank != b.type.rank or a.shape[:-2] != b.shape[:-2]:
        return "the operands do not share their batch dims"
    if any(f.type.rank != 3 or f.shape[1:] != x.shape[-2:] for f, x in zip(flat, (a, b))) or \
            out.shape != a.shape[:-1] + b.shape[-1:]:
        return "the reshapes do not flatten and restore the batch dims"
    return None


def _batched(m, b):
    return b.emit("matmul", [m["x"], m["y"]])


def _rows_fit(m) -> str | None:
    x, part = m.nodes["lin"].outputs[0], m.nodes["slice"].outputs[0]
    start, end, axis, step = (m[n].sym for n in ("st", "en", "ax", "sp"))
    if axis not in ((-1,), (x.type.rank - 1,)) or step not in (None, (1,)) or start is None or end is None:
        return "the slice is not a constant range of the last axis"
    n = x.shape[-1]
    lo, hi = max(start[0] + n if start[0] < 0 else start[0], 0), min(end[0] + n if end[0] < 0 else end[0], n)
    if hi <= lo or part.shape[-1] != hi - lo:
        return "the slice is empty"
    return None


def _slice_rows(m, b):
    """A range of a projection's output features (Phi-3 cuts q, k, v and gate, up out of its
    fused projections with Slice) is a linear of its own over those weight rows; fuse_qkv merges
    q, k and v again into the layout every family has."""
    lin, n = m.nodes["lin"], m.nodes["lin"].outputs[0].shape[-1]
    start, end = m["st"].sym[0], m["en"].sym[0]
    lo, hi = max(start + n if start < 0 else start, 0), min(end + n if end < 0 else end, n)
    inputs = [m["x"], b.param(m.data("w")[lo:hi], f"{m['w'].name}.rows{lo}")]
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        inputs.append(b.param(b.graph.const_value(lin.inputs[2])[lo:hi], "bias_rows"))
    return b.emit("linear", inputs)


def _has_empty(m) -> str | None:
    node = m.nodes["cat"]
    axis = node.attrs["axis"]
    return None if any(v.shape[axis] == 0 for v in node.inputs) else "no empty part"


def _drop_empty(m, b):
    """concat(x, empty) is x: Phi-3 appends the features past the rotary dim, none when rotary
    covers the whole head."""
    node = m.nodes["cat"]
    parts = [v for v in node.inputs if v.shape[node.attrs["axis"]] != 0]
    return parts[0] if len(parts) == 1 else b.emit("concat", parts, axis=node.attrs["axis"])


def _is_2d(data) -> str | None:
    return None if data.ndim == 2 else f"weight has rank {data.ndim}, not 2"


def _inner_fits(m) -> str | None:
    x, w = m["x"], m["w"]
    return None if x.shape[-1] == w.shape[0] else f"{x.name} {x.type} does not fit weight {w.type}"


def _to_linear(m, b):
    w = m.data("w")
    wt = b.param(w.T, f"{m['w'].name}.T")
    return b.emit("linear", [m["x"], wt])


def _bias_fits(m) -> str | None:
    n = m["w"].shape[0]
    shape = m["b"].shape
    return None if tuple(shape) == (n,) else f"bias {m['b'].type} does not fit {n} outputs"


def _with_bias(m, b):
    return b.emit("linear", [m["x"], m["w"], m["b"]])


def _flatten_fits(m) -> str | None:
    """reshape(linear(reshape(x, [n, k])), lead + [m]) is linear(reshape(x, lead + [k])) when
    n = prod(lead): the GEMM keeps the leading dims instead of flattening them."""
    inner, out = m.nodes["inner"].outputs[0], m.nodes["outer"].outputs[0]
    lead = out.shape[:-1]
    if inner.type.rank != 2 or out.shape[-1] != m["w"].shape[0]:
        return f"{inner.name} is not a [rows, features] view"
    rows = 1
    for d in lead:
        rows = rows * d
    if rows != inner.shape[0]:
        return f"{out.name} does not restore the rows of {inner.name}"
    if not all(isinstance(d, int) or d.atoms <= m.graph.symbols() for d in lead):
        return f"{out.name} has dims that are not known at run time"
    return None


def _unwrap_linear(m, b):
    x, w = m["x"], m["w"]
    lead = m.nodes["outer"].outputs[0].shape[:-1]
    if x.shape != lead + (w.shape[1],):
        x = b.emit("reshape", [x, b.emit("dims", [], values=tuple(lead) + (w.shape[1],))])
    return b.emit("linear", [x, w] + ([m["b"]] if "b" in m.values else []))


def _same_shape(m) -> str | None:
    v = m.nodes["r"].outputs[0]
    return None if v.shape == m["x"].shape else "changes the shape"


def _drop(m, b):
    return m["x"]


def _transpose_twice(m, b):
    p1, p2 = m.nodes["t1"].attrs["perm"], m.nodes["t2"].attrs["perm"]
    perm = tuple(p1[i] for i in p2)
    if perm == tuple(range(len(perm))):
        return m["x"]
    return b.emit("transpose", [m["x"]], perm=perm)


def _has_perms(m) -> str | None:
    if m.nodes["t1"].attrs["perm"] is None or m.nodes["t2"].attrs["perm"] is None:
        return "implicit permutation"
    return None


RULES = [
    Rule("one_over", Op("div", Const("one", value=1.0), Y), _reciprocal, near_miss_depth=9),
    Rule("div_by_const", Op("div", Var("x", where=_float), Const("c")), _div_by_const,
         near_miss_depth=9),
    Rule("divide", Op("div", Var("x", where=_float), Var("y")), _divide, near_miss_depth=9),
    Rule("swap_last_two", Op("reshape", Op("transpose", Op("reshape", X, S, bind="inner"),
                                           attrs={"perm": (0, 2, 1)}), S2, bind="outer"),
         _swap_last_two, check=_swap_fits, near_miss_depth=4),
    Rule("outer_product", Op("matmul", X, Y), _outer_product, check=_inner_one, near_miss_depth=9),
    Rule("batched_matmul", Op("reshape", Op("matmul", Op("reshape", X, S, bind="fa"), Op("reshape", Y, S2, bind="fb")),
                              Var("s3"), bind="out"), _batched, check=_batched_fits, near_miss_depth=4),
    Rule("matmul_to_linear", Op("matmul", X, Const("w", where=_is_2d)), _to_linear,
         check=_inner_fits),
    Rule("linear_bias", Op("add", Op("linear", X, W), B), _with_bias, check=_bias_fits,
         near_miss_depth=3),
    Rule("linear_unflatten", Op("reshape", Op("linear", Op("reshape", X, S, bind="inner", shared=True), W),
                                S2, bind="outer"), _unwrap_linear, check=_flatten_fits, near_miss_depth=3),
    Rule("linear_bias_unflatten", Op("reshape", Op("linear", Op("reshape", X, S, bind="inner", shared=True), W, B),
                                     S2, bind="outer"), _unwrap_linear, check=_flatten_fits,
         near_miss_depth=3),
    Rule("noop_reshape", Op(("reshape", "expand"), X, S, bind="r"), _drop, check=_same_shape,
         near_miss_depth=9),
    Rule("push_scale", Op(("reshape", "transpose"), Op("mul", X, Const("c", where=_scalar)),
                          rest=True, bind="view"), _push_scale, near_miss_depth=9),
    Rule("mul_one", Op("mul", X, Const("one", value=1.0), bind="mul"), _drop, check=_keeps_shape,
         near_miss_depth=9),
    Rule("mul_mul", Op("mul", Op("mul", X, Const("c1", where=_scalar)), Const("c2", where=_scalar), bind="mul"),
         _scales, check=_keeps_shape, near_miss_depth=9),
    Rule("deinterleave_qkv", Op("split", Op("transpose", Op("reshape", Op("linear", X, W, rest=True, bind="lin"),
                                                            S, bind="view"), attrs={"perm": (0, 2, 1, 3)}),
                                bind="split"), _deinterleave, check=_interleaved_fits, near_miss_depth=9),
    Rule("deinterleave_qkv", Op("slice", Op("transpose", Op("reshape", Op("linear", X, W, rest=True, bind="lin",
                                                                      shared=True),
                                                            S, bind="view", shared=True),
                                            attrs={"perm": (0, 2, 1, 3)}, shared=True),
                                Var("st"), Var("en"), Var("ax"), Var("sp"), bind="slice"),
         _deinterleave_third, check=_third_fits, near_miss_depth=9),
    Rule("single_concat", Op("concat", X), _drop, near_miss_depth=9),
    Rule("concat_empty", Op("concat", X, rest=True, bind="cat"), _drop_empty, check=_has_empty, near_miss_depth=9),
    Rule("slice_of_linear", Op("slice", Op("linear", X, W, rest=True, bind="lin", shared=True),
                               Var("st"), Var("en"), Var("ax"), Var("sp"), bind="slice"),
         _slice_rows, check=_rows_fit, near_miss_depth=9),
    Rule("transpose_transpose", Op("transpose", Op("transpose", X, bind="t1"), bind="t2"),
         _transpose_twice, check=_has_perms, near_miss_depth=9),
]

canonicalize = rule_pass("canonicalize", RULES)
