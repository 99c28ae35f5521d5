"""The op registry: every IR op is declared once, with its meaning.

An `OpDef` names the op's inputs and attributes (with defaults), infers output types from input
types, optionally propagates symbolic contents of small integer tensors (shape arithmetic), and
gives a numpy reference implementation. The reference implementation is the definition of the
op: the reference executor runs it, and every backend kernel is tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

REQUIRED = object()  # attribute default meaning "must be given"


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]  # "x"; "bias?" optional; "xs*" variadic (last only)
    attrs: dict[str, Any]
    infer: Callable  # (inputs: list[Value | None], **attrs) -> list[TensorType]
    ref: Callable  # (*arrays, **attrs) -> array or tuple of arrays
    sym: Callable | None = None  # (inputs, **attrs) -> symbolic contents of output 0, or None
    doc: str = field(default="", compare=False)

    def bind_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise TypeError(f"op {self.name}: unknown attribute(s) {sorted(unknown)}")
        bound = {k: attrs.get(k, default) for k, default in self.attrs.items()}
        missing = [k for k, v in bound.items() if v is REQUIRED]
        if missing:
            raise TypeError(f"op {self.name}: missing attribute(s) {missing}")
        return bound

    def check_inputs(self, inputs: list) -> None:
        required = [n for n in self.inputs if not n.endswith(("?", "*"))]
        variadic = bool(self.inputs) and self.inputs[-1].endswith("*")
        if len(inputs) < len(required) or (not variadic and len(inputs) > len(self.inputs)):
            raise TypeError(f"op {self.name} takes inputs ({', '.join(self.inputs)}), "
                            f"got {len(inputs)}")
        for name, v in zip(self.inputs, inputs):
            if v is None and not name.endswith("?"):
                raise TypeError(f"op {self.name}: input {name!r} is required")

    def propagate_sym(self, inputs: list, n_outputs: int, **attrs) -> list:
        out = [None] * n_outputs
        if self.sym is not None and n_outputs == 1:
            out[0] = self.sym(inputs, **attrs)
        return out


_REGISTRY: dict[str, OpDef] = {}


def register(name: str, inputs: tuple[str, ...], attrs: dict[str, Any] | None = None, *,
             infer: Callable, sym: Callable | None = None):
    """Decorator: the decorated function is the op's numpy reference implementation."""

    def wrap(ref: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"op {name} registered twice")
        _REGISTRY[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, ref, sym,
                                (ref.__doc__ or "").strip())
        return ref

    return wrap


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no IR op named {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)
