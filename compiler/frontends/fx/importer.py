"""Read a torch.fx GraphModule at the ATen level into an IR Graph.

The graph comes from `torch.compile` (through AOTAutograd) or from `torch.export`: placeholders
are the inputs (their FakeTensor metadata gives dtypes and shapes, with SymInts for dynamic
dims), `get_attr` nodes and the placeholders named in `constants` are weights, and every
`call_function` is an ATen op that the converter table turns into IR ops. Symbolic dims keep
the names of torch's shape environment (`s0`, `s1`, ...); the runtime binds them from the
shapes of the tensors it is given.
"""

from __future__ import annotations

import inspect
import operator

import numpy as np

from ...errors import LlmcError
from ...ir.dtypes import DType
from ...ir.graph import Graph, TensorType, Value
from ...ir.symbolic import Sym
from .converters import CONVERTERS, SYM_OPS, op_key


class FxConversionError(LlmcError):
    """An FX node the frontend cannot convert: names the node and its ATen op."""

    def __init__(self, node, reason: str):
        self.node_name, self.target = node.name, _target_name(node)
        super().__init__(f"FX node {node.name!r} ({self.target}): {reason}")


def _target_name(node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def from_fx(gm, constants: dict[str, "object"] | None = None, name: str = "fx",
            failures: dict[str, str] | None = None) -> Graph:
    """`constants`: placeholder name -> tensor, for inputs that are weights (the parameters
    AOTAutograd lifts to inputs); they become parameters of the IR graph. A node that does not
    convert raises FxConversionError, or with `failures` given is recorded there (FX node name
    -> why) and stands in as an input, so that one conversion finds every such node."""
    return _Importer(gm, constants or {}, name, failures).run()


def from_exported_program(ep, name: str = "exported") -> Graph:
    """A `torch.export` ExportedProgram, decomposed to ATen ops; its parameters, buffers and
    tensor constants become the graph's parameters."""
    ep = ep.run_decompositions()
    constants = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None and spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            value = ep.state_dict.get(spec.target)
            constants[spec.arg.name] = value if value is not None else ep.constants[spec.target]
    return from_fx(ep.graph_module, constants, name)


def torch_dtype(dtype) -> DType:
    import torch

    table = {torch.float32: DType.f32, torch.float16: DType.f16, torch.bfloat16: DType.bf16,
             torch.float64: DType.f64, torch.int64: DType.i64, torch.int32: DType.i32,
             torch.int8: DType.i8, torch.uint8: DType.u8, torch.bool: DType.bool}
    if dtype not in table:
        raise TypeError(f"element type {dtype} is not supported")
    return table[dtype]


def sym_dim(d):
    """A torch size (int or SymInt) as an IR dim: symbols keep torch's names."""
    if isinstance(d, int):
        return d
    expr = d.node.expr
    if expr.is_Integer:
        return int(expr)
    return _from_sympy(expr)


def _from_sympy(expr):
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return Sym.var(str(expr))
    if expr.is_Add:
        out = 0
        for a in expr.args:
            out = out + _from_sympy(a)
        return out
    if expr.is_Mul:
        out = 1
        for a in expr.args:
            out = out * _from_sympy(a)
        return out
    raise TypeError(f"symbolic size {expr} is not a polynomial of the input sizes")


def tensor_type(val) -> TensorType:
    return TensorType(tuple(sym_dim(d) for d in val.shape), torch_dtype(val.dtype))


class _Importer:
    def __init__(self, gm, constants: dict, name: str, failures: dict | None = None):
        self.gm, self.constants, self.failures = gm, constants, failures
        self.graph = Graph(name)
        self.graph.metadata.update(source="torch.fx")
        self.env: dict = {}  # fx node -> Value | dim | tuple of those
        self.node = None

    def run(self) -> Graph:
        for node in self.gm.graph.nodes:
            self.node = node
            try:
                try:
                    self.env[node] = self._convert(node)
                except LlmcError:
                    raise
                except (TypeError, ValueError, KeyError, IndexError) as e:
                    self.fail(str(e))
            except FxConversionError as e:
                if self.failures is None or node.op != "call_function":
                    raise
                self.failures[node.name] = str(e).split(": ", 1)[1]
                self.env[node] = self._stand_in(node)
        return self.graph

    def _stand_in(self, node):
        """A node that did not convert, as a graph input of torch's type: where it runs in eager
        and what follows is compiled, its result is an input there."""
        def one(val, name):
            return self.graph.add_input(name, tensor_type(val)) if hasattr(val, "shape") else None
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return tuple(one(v, f"{node.name}.{i}") for i, v in enumerate(val))
        return one(val, node.name)

    def _convert(self, node):
        g = self.graph
        if node.op == "placeholder":
            val = node.meta.get("val")
            if node.name in self.constants:
                return g.add_param(node.name, self.constants[node.name].detach().cpu().numpy())
            if val is None:
                self.fail("the placeholder has no 'val' metadata (FakeTensor)")
            if not hasattr(val, "shape"):  # a SymInt input: the dim itself, bound at run time
                return sym_dim(val)
            return g.add_input(node.name, tensor_type(val))
        if node.op == "get_attr":
            t = operator.attrgetter(node.target)(self.gm)
            return g.add_param(node.name, t.detach().cpu().numpy())
        if node.op == "output":
            outs = node.args[0]
            for v in (outs if isinstance(outs, (tuple, list)) else [outs]):
                value = self.env[v] if v is not None else None
                if not isinstance(value, Value):
                    self.fail(f"output {v} is not a tensor")
                if value.kind != "node" or value in g.outputs:
                    value = g.add_node("identity", [value], name=f"{v.name}.out")[0]
                g.outputs.append(value)
            return None
        if node.op != "call_function":
            self.fail(f"{node.op} nodes are not supported (the graph must be at the ATen level)")
        if node.target is operator.getitem:
            return self.env[node.args[0]][node.args[1]]
        key = op_key(node.target)
        if key in SYM_OPS:
            return SYM_OPS[key](*self._args(node.args))
        fn = CONVERTERS.get(key)
        if fn is None:
            self.fail("no converter for this op")
        args, kwargs = self._args(node.args), {k: self._args(v) for k, v in node.kwargs.items()}
        try:
            inspect.signature(fn).bind(self, *args, **kwargs)
        except TypeError as e:
            self.fail(f"unsupported arguments ({e})")
        out = fn(self, *args, **kwargs)
        self._check(out, node.meta.get("val"))
        return out

    def _args(self, a):
        import torch

        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._args(x) for x in a)
        return a

    def _check(self, out, val):
        """The IR's inferred shape must be torch's: a converter that got it wrong fails here,
        at the node, rather than far away."""
        if val is None or not isinstance(out, Value) or not hasattr(val, "shape"):
            return
        want = tensor_type(val)
        if want.shape != out.shape or want.dtype != out.dtype:
            self.fail(f"converted to {out.type}, but torch says {want}")

    # The context converters use -------------------------------------------------------------
    def fail(self, reason: str):
        raise FxConversionError(self.node, reason)

    @property
    def op_name(self) -> str:
        """The ATen op's name without namespace and overload (`native_layer_norm`)."""
        return self.node.target.overloadpacket.__name__

    @property
    def out_type(self) -> TensorType:
        """The node's result type, as torch inferred it."""
        return tensor_type(self.node.meta["val"])

    def emit(self, op: str, inputs, **attrs) -> Value:
        (out,) = self.emit_multi(op, inputs, **attrs)
        return out

    def emit_multi(self, op: str, inputs, **attrs) -> list[Value]:
        return self.graph.add_node(op, list(inputs), attrs, name=self.node.name)

    def const(self, array, dtype: DType | None = None) -> Value:
        array = np.asarray(array, dtype.numpy() if dtype else None)
        return self.graph.add_param(f"{self.node.name}.const", array)

    def dims(self, values) -> Value:
        """A 1-D i64 tensor of dims (ints, or symbols bound at run time)."""
        values = tuple(values)
        if all(isinstance(d, int) for d in values):
            return self.const(np.array(values, np.int64))
        return self.emit("dims", [], values=values)

    def scalar_dim(self, d) -> Value:
        """A 0-d i64 tensor holding one dim."""
        if isinstance(d, int):
            return self.const(np.array(d, np.int64))
        return self.emit("squeeze", [self.dims([d])], axes=(0,))
