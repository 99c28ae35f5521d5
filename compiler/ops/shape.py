"""Shape and data-movement ops. Their inference is where symbolic dims are made and kept:
`shape` turns a tensor's dims into symbolic contents, and `reshape`, `expand`, `slice`,
`range` and `constant_of_shape` turn symbolic contents back into dims."""

from __future__ import annotations

import numpy as np

from ..ir.dtypes import DType
from ..ir.graph import TensorType
from ..ir.symbolic import Dim, dim_min
from ..ir.symbolic import div as sym_div
from .infer import broadcast_shapes, normalize_axis, sym_list, sym_of
from .registry import REQUIRED, register

_INT_MAX = 2**31 - 1  # exporters write "to the end" as INT32_MAX or INT64_MAX


# shape ----------------------------------------------------------------------------------------
def _shape_range(rank, start, end):
    end = rank if end is None else end
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    return start, end


def _shape_infer(inputs, start, end):
    s, e = _shape_range(inputs[0].type.rank, start, end)
    return [TensorType((max(0, e - s),), DType.i64)]


def _shape_sym(inputs, start, end):
    s, e = _shape_range(inputs[0].type.rank, start, end)
    return tuple(inputs[0].shape[s:e])


@register("shape", ("x",), {"start": 0, "end": None}, infer=_shape_infer, sym=_shape_sym)
def shape(x, start, end):
    s, e = _shape_range(x.ndim, start, end)
    return np.array(x.shape[s:e], np.int64)


# reshape --------------------------------------------------------------------------------------
def _reshape_dims(in_shape, target, allowzero):
    target = list(target)
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            target[i] = in_shape[i]
    if -1 in target:
        known: Dim = 1
        for d in target:
            if d != -1:
                known = known * d
        numel: Dim = 1
        for d in in_shape:
            numel = numel * d
        target[target.index(-1)] = sym_div(numel, known)
    return tuple(target)


def _reshape_infer(inputs, allowzero):
    x, shape_v = inputs
    target = sym_list(shape_v)
    if target is None:
        return [TensorType((None,) * shape_v.shape[0], x.dtype)]
    return [TensorType(_reshape_dims(x.shape, target, allowzero), x.dtype)]


def _reshape_sym(inputs, allowzero):
    s = sym_of(inputs[0])
    target = sym_list(inputs[1])
    if s is None or target is None:
        return None
    flat = list(s) if isinstance(s, tuple) else [s]
    out = _reshape_dims((len(flat),), target, allowzero)
    return tuple(flat) if len(out) == 1 else (flat[0] if len(out) == 0 else None)


@register("reshape", ("x", "shape"), {"allowzero": 0}, infer=_reshape_infer, sym=_reshape_sym)
def reshape(x, shape, allowzero):
    target = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]
    return x.reshape(target)


# transpose ------------------------------------------------------------------------------------
def _transpose_infer(inputs, perm):
    x = inputs[0]
    perm = perm if perm is not None else tuple(reversed(range(x.type.rank)))
    return [x.type.with_shape(x.shape[p] for p in perm)]


@register("transpose", ("x",), {"perm": None}, infer=_transpose_infer)
def transpose(x, perm):
    return np.transpose(x, perm)


# squeeze / unsqueeze / flatten ----------------------------------------------------------------
def _squeeze_axes(shape, axes):
    if axes is None:
        return [i for i, d in enumerate(shape) if d == 1]
    return sorted(normalize_axis(a, len(shape), "squeeze") for a in axes)


def _squeeze_infer(inputs, axes):
    x = inputs[0]
    drop = _squeeze_axes(x.shape, axes)
    return [x.type.with_shape(d for i, d in enumerate(x.shape) if i not in drop)]


def _squeeze_sym(inputs, axes):
    s = sym_of(inputs[0])
    return s[0] if isinstance(s, tuple) and len(s) == 1 else None


@register("squeeze", ("x",), {"axes": None}, infer=_squeeze_infer, sym=_squeeze_sym)
def squeeze(x, axes):
    return np.squeeze(x, axis=tuple(_squeeze_axes(x.shape, axes)))


def _unsqueeze_shape(shape, axes):
    rank = len(shape) + len(axes)
    axes = sorted(normalize_axis(a, rank, "unsqueeze") for a in axes)
    out, it = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(it))
    return tuple(out)


def _unsqueeze_infer(inputs, axes):
    return [inputs[0].type.with_shape(_unsqueeze_shape(inputs[0].shape, axes))]


def _unsqueeze_sym(inputs, axes):
    s = sym_of(inputs[0])
    return (s,) if s is not None and not isinstance(s, tuple) and len(axes) == 1 else None


@register("unsqueeze", ("x",), {"axes": REQUIRED}, infer=_unsqueeze_infer, sym=_unsqueeze_sym)
def unsqueeze(x, axes):
    return x.reshape(_unsqueeze_shape(x.shape, axes))


def _flatten_infer(inputs, axis):
    x = inputs[0]
    axis = normalize_axis(axis, x.type.rank + 1, "flatten")
    outer, inner = TensorType(x.shape[:axis], x.dtype).numel, TensorType(x.shape[axis:], x.dtype).numel
    return [x.type.with_shape((outer, inner))]


@register("flatten", ("x",), {"axis": 1}, infer=_flatten_infer)
def flatten(x, axis):
    axis = axis % (x.ndim + 1) if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


# concat / split -------------------------------------------------------------------------------
def _concat_infer(inputs, axis):
    first = inputs[0]
    axis = normalize_axis(axis, first.type.rank, "concat")
    total: Dim = 0
    for v in inputs:
        total = total + v.shape[axis]
    shape = list(broadcast_shapes(*(v.shape[:axis] + (1,) + v.shape[axis + 1:] for v in inputs)))
    shape[axis] = total
    return [first.type.with_shape(shape)]


def _concat_sym(inputs, axis):
    parts = [sym_list(v) for v in inputs]
    if any(p is None for p in parts) or inputs[0].type.rank != 1:
        return None
    return tuple(d for p in parts for d in p)


@register("concat", ("xs*",), {"axis": REQUIRED}, infer=_concat_infer, sym=_concat_sym)
def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


def _split_sizes(dim, sizes, num_outputs):
    if sizes is not None:
        return list(sizes)
    if isinstance(dim, int):
        chunk = -(-dim // num_outputs)  # ONNX: equal chunks, the last one smaller
        return [chunk] * (num_outputs - 1) + [dim - chunk * (num_outputs - 1)]
    return [sym_div(dim, num_outputs)] * num_outputs


def _split_infer(inputs, axis, sizes, num_outputs):
    x = inputs[0]
    axis = normalize_axis(axis, x.type.rank, "split")
    out = []
    for size in _split_sizes(x.shape[axis], sizes, num_outputs):
        shape = list(x.shape)
        shape[axis] = size
        out.append(x.type.with_shape(shape))
    return out


@register("split", ("x",), {"axis": 0, "sizes": None, "num_outputs": None}, infer=_split_infer)
def split(x, axis, sizes, num_outputs):
    """Split along `axis` into pieces of `sizes`, or into `num_outputs` equal pieces."""
    sizes = _split_sizes(x.shape[axis], sizes, num_outputs)
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


# slice ----------------------------------------------------------------------------------------
def _slice_dim(dim, start, end, step):
    """Length of dim[start:end:step] with symbolic bounds, or None when it cannot be known.
    A symbolic end is assumed to lie within the dim, as exporters write it (`cos_cache[:seq]`
    has seq rows); a negative start on a symbolic dim clamps (`x[-4095:]` has min(dim, 4095))."""
    if isinstance(dim, int) and all(isinstance(x, int) for x in (start, end)):
        return len(range(*slice(start, end, step).indices(dim)))
    if step != 1:
        return None
    to_end = isinstance(end, int) and end >= _INT_MAX
    if isinstance(start, int) and start < 0:
        return dim_min(dim, -start) if to_end else None
    if to_end:
        end = dim
    elif isinstance(end, int) and end < 0:
        end = dim + end
    return end - start


def _slice_params(inputs):
    x, starts, ends, axes, steps = (list(inputs) + [None] * 5)[:5]
    starts, ends = sym_list(starts), sym_list(ends)
    axes = sym_list(axes) if axes is not None else list(range(len(starts or [])))
    steps = sym_list(steps) if steps is not None else [1] * len(axes or [])
    return starts, ends, axes, steps


def _slice_infer(inputs):
    x = inputs[0]
    starts, ends, axes, steps = _slice_params(inputs)
    if None in (starts, ends, axes, steps) or not all(isinstance(a, int) for a in axes + steps):
        return [x.type.with_shape([None] * x.type.rank)]
    shape = list(x.shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = normalize_axis(axis, x.type.rank, "slice")
        shape[axis] = _slice_dim(shape[axis], start, end, step)
    return [x.type.with_shape(shape)]


def _slice_sym(inputs):
    s = sym_of(inputs[0])
    starts, ends, axes, steps = _slice_params(inputs)
    if not isinstance(s, tuple) or None in (starts, ends, axes, steps):
        return None
    if not all(isinstance(x, int) for x in starts + ends + steps):
        return None
    return tuple(s[slice(starts[0], ends[0], steps[0])])


@register("slice", ("x", "starts", "ends", "axes?", "steps?"), infer=_slice_infer, sym=_slice_sym)
def slice_(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return x[tuple(index)]


# gather ---------------------------------------------------------------------------------------
def _gather_infer(inputs, axis):
    x, idx = inputs
    axis = normalize_axis(axis, x.type.rank, "gather")
    return [x.type.with_shape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _gather_sym(inputs, axis):
    s, idx = sym_of(inputs[0]), sym_of(inputs[1])
    if not isinstance(s, tuple) or idx is None:
        return None
    pick = lambda i: s[i] if isinstance(i, int) and -len(s) <= i < len(s) else None  # noqa: E731
    out = tuple(pick(i) for i in idx) if isinstance(idx, tuple) else pick(idx)
    return None if out is None or (isinstance(out, tuple) and None in out) else out


@register("gather", ("x", "indices"), {"axis": 0}, infer=_gather_infer, sym=_gather_sym)
def gather(x, indices, axis):
    return np.take(x, indices.astype(np.int64), axis=axis)


def _gather_nd_infer(inputs, batch_dims):
    x, idx = inputs
    last = idx.shape[-1]
    if not isinstance(last, int):
        raise ValueError("gather_nd: the last dim of indices must be static")
    return [x.type.with_shape(idx.shape[:-1] + x.shape[batch_dims + last:])]


@register("gather_nd", ("x", "indices"), {"batch_dims": 0}, infer=_gather_nd_infer)
def gather_nd(x, indices, batch_dims):
    batch_shape = x.shape[:batch_dims]
    nb = int(np.prod(batch_shape)) if batch_dims else 1
    xb = x.reshape((nb,) + x.shape[batch_dims:])
    ib = indices.reshape((nb,) + indices.shape[batch_dims:])
    k = indices.shape[-1]
    out = []
    for b in range(nb):
        idx = ib[b].reshape(-1, k)
        out.append(xb[b][tuple(idx.T)] if k else np.broadcast_to(xb[b], (len(idx),) + xb[b].shape))
    tail = x.shape[batch_dims + k:]
    return np.stack(out).reshape(indices.shape[:-1] + tail)


# expand / range / constant_of_shape -----------------------------------------------------------
def _expand_infer(inputs):
    x, shape_v = inputs
    target = sym_list(shape_v)
    if target is None:
        return [x.type.with_shape([None] * max(x.type.rank, shape_v.shape[0]))]
    return [x.type.with_shape(broadcast_shapes(x.shape, tuple(target)))]


@register("expand", ("x", "shape"), infer=_expand_infer)
def expand(x, shape):
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))).copy()


def _range_infer(inputs):
    start, limit, delta = (sym_of(v) for v in inputs)
    n = None
    if delta == 1 and start is not None and limit is not None:
        n = limit - start
    elif all(isinstance(x, int) for x in (start, limit, delta)):
        n = len(range(start, limit, delta))
    return [TensorType((n,), inputs[0].dtype)]


def _range_sym(inputs):
    start, limit, delta = (sym_of(v) for v in inputs)
    if all(isinstance(x, int) for x in (start, limit, delta)) and len(range(start, limit, delta)) <= 64:
        return tuple(range(start, limit, delta))
    return None


@register("range", ("start", "limit", "delta"), infer=_range_infer, sym=_range_sym)
def range_(start, limit, delta):
    return np.arange(start, limit, delta, dtype=start.dtype)


def _cos_infer(inputs, value):
    target = sym_list(inputs[0])
    shape = tuple(target) if target is not None else (None,) * inputs[0].shape[0]
    return [TensorType(shape, DType.from_numpy(value.dtype))]


def _cos_sym(inputs, value):
    target = sym_list(inputs[0])
    if target is None or value.dtype.kind not in "iu" or len(target) > 1:
        return None
    fill = int(value.reshape(-1)[0])
    if not target:
        return fill
    n = target[0]
    return (fill,) * n if isinstance(n, int) and n <= 64 else None


@register("constant_of_shape", ("shape",), {"value": np.zeros(1, np.float32)},
          infer=_cos_infer, sym=_cos_sym)
def constant_of_shape(shape, value):
    return np.full(tuple(int(d) for d in shape), value.reshape(-1)[0], dtype=value.dtype)


def _trilu_infer(inputs, upper):
    return [inputs[0].type]


@register("trilu", ("x", "k?"), {"upper": 1}, infer=_trilu_infer)
def trilu(x, k=None, upper=1):
    k = 0 if k is None else int(k)
    return np.triu(x, k) if upper else np.tril(x, k)


def _cumsum_infer(inputs, exclusive, reverse):
    return [inputs[0].type]


@register("cumsum", ("x", "axis"), {"exclusive": 0, "reverse": 0}, infer=_cumsum_infer)
def cumsum(x, axis, exclusive, reverse):
    axis = int(axis)
    y = np.flip(x, axis) if reverse else x
    out = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive:
        out = out - y
    return np.flip(out, axis) if reverse else out
