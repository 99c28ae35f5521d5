"""Shared type-inference rules: broadcasting, axis normalization, symbolic contents."""

from __future__ import annotations

from ..ir.graph import TensorType, Value
from ..ir.symbolic import Dim, Sym


def normalize_axis(axis: int, rank: int, op: str = "") -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_dim(dims: list[Dim]) -> Dim:
    """Numpy broadcasting of one position. Two different symbolic dims are assumed equal (the
    model would fail at run time otherwise); the simpler spelling is kept."""
    rest = [d for d in dims if d != 1]
    if not rest:
        return 1
    static = [d for d in rest if isinstance(d, int)]
    if len(set(static)) > 1:
        raise ValueError(f"cannot broadcast dims {dims}")
    if static:
        return static[0]
    return min(rest, key=lambda d: (len(d.terms), str(d)))


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return tuple(broadcast_dim([s[i] for s in padded]) for i in range(rank))


def same_dtype(op: str, values: list[Value]):
    dtypes = {v.dtype for v in values if v is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{op}: inputs have different dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def elementwise(op: str, values: list[Value], dtype=None) -> list[TensorType]:
    shape = broadcast_shapes(*(v.shape for v in values))
    return [TensorType(shape, dtype if dtype is not None else same_dtype(op, values))]


def sym_of(v: Value | None):
    """The symbolic contents of a small integer tensor: a dim (0-d) or a tuple of dims (1-d)."""
    return None if v is None else v.sym


def sym_list(v: Value | None) -> list[Dim] | None:
    s = sym_of(v)
    if s is None:
        return None
    return list(s) if isinstance(s, tuple) else [s]


def is_dim(x) -> bool:
    return isinstance(x, (int, Sym))
