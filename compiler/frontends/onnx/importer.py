"""Read an ONNX file into an IR Graph.

The file is checked before anything is converted: it must exist and parse as an ONNX model, its
external data must be present, and every op must have a converter. All unsupported op types are
reported together, each with the nodes that use it. Conversion then runs node by node through the
converter table; a node that cannot be converted is reported with its name and op type.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np

from ...errors import ConversionError, LlmcError, ModelLoadError, UnsupportedOpsError
from ...ir.dtypes import DType
from ...ir.graph import Graph, TensorType, Value
from ...ir.symbolic import Sym
from ..roles import find_roles
from . import wire
from .converters import CONVERTERS, RENAMED_ATTRS

_STANDARD_DOMAINS = ("", "ai.onnx")


def from_onnx(path, decoder: bool = False) -> Graph:
    """Load an ONNX model file (initializers inline or as external data) as an IR graph.

    A decoder's inputs and outputs get their roles (`frontends.roles`): the file is read with its
    dims bound to them (batch, seq, past, total) and the roles go to `graph.metadata["roles"]`.
    With `decoder`, a role that cannot be found is an error naming the file; without, such a
    graph (an encoder, a single op) is returned as the file declares it."""
    path = Path(path)
    model, raw = _load_proto(path)
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None)
    if opset is None:
        raise ModelLoadError(f"{path}: the model imports no standard ONNX opset")
    if model.functions:
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        key = _op_key(node)
        if key not in CONVERTERS:
            missing.setdefault(key, []).append(node.name or f"#{i}")
    if missing:
        raise UnsupportedOpsError(path, opset, missing)
    graph = _Importer(path, model, raw, opset).run()
    try:
        roles = find_roles(graph, path)
    except ModelLoadError:
        if decoder:
            raise
        return graph
    if any(d != Sym.var(name) for name, d in roles.dims.items()):
        graph = _Importer(path, model, raw, opset, roles.dims).run()
        roles = find_roles(graph, path)
    graph.metadata.update(roles=roles.to_json(), kv_pairs=roles.caches)
    return graph


def describe_file(path) -> dict:
    """What an ONNX file declares, without converting it: producer, opset, inputs and outputs
    with their declared types, and how often each op occurs (`supported`: those with a
    converter). For `llmc inspect` of a file that does not import."""
    import collections

    from onnx import TensorProto

    model, _ = _load_proto(Path(path))

    def declared(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim]
        dtype = TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type in TensorProto.DataType.values() else "?"
        return f"{dtype}[{', '.join(dims)}]"
    ops = collections.Counter(_op_key(n) for n in model.graph.node)
    return {"producer": f"{model.producer_name} {model.producer_version}".strip(),
            "opset": next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), None),
            "inputs": [(vi.name, declared(vi)) for vi in model.graph.input],
            "outputs": [(vi.name, declared(vi)) for vi in model.graph.output],
            "ops": ops, "supported": {op for op in ops if op in CONVERTERS}}


def _op_key(node) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}.{node.op_type}"


def _scope(node) -> str:
    """The module path a node was exported from: the dynamo exporter records it in the node's
    metadata, the TorchScript exporter in the node's name (`/model/layers.0/mlp/Mul_1`)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return ""


def _load_proto(path: Path):
    """The file's ModelProto, its inline initializers without their bytes, and {initializer
    name: the (offset, length) of its bytes in the file, or None} (`wire.split_model`)."""
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    try:
        data, raw = wire.split_model(path)
        model = onnx.ModelProto.FromString(data)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    if model.ir_version == 0 or not model.HasField("graph") or not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph with outputs in it)")
    return model, {t.name: where for t, where in zip(model.graph.initializer, raw)}


def onnx_dtype(path, elem_type: int, what: str) -> DType:
    from onnx import TensorProto

    table = {TensorProto.FLOAT: DType.f32, TensorProto.FLOAT16: DType.f16,
             TensorProto.BFLOAT16: DType.bf16, TensorProto.DOUBLE: DType.f64,
             TensorProto.INT64: DType.i64, TensorProto.INT32: DType.i32,
             TensorProto.INT8: DType.i8, TensorProto.UINT8: DType.u8, TensorProto.BOOL: DType.bool}
    if elem_type not in table:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
            else str(elem_type)
        raise ModelLoadError(f"{path}: {what} has unsupported element type {name}")
    return table[elem_type]


class _Importer:
    def __init__(self, path: Path, model, raw: dict, opset: int, dims: dict | None = None):
        self.path, self.model, self.raw, self.opset = path, model, raw, opset
        self.dims = dims or {}  # the file's dim names -> the dims of their roles
        self.graph = Graph(model.graph.name or path.stem)
        self.graph.metadata.update(source=str(path), opset=opset,
                                   producer=f"{model.producer_name} {model.producer_version}".strip())
        self.env: dict[str, Value] = {}
        self.node = None
        self.scope = ""
        self.created: list[Value] = []

    def run(self) -> Graph:
        g = self.graph
        for t in self.model.graph.initializer:
            self._initializer(t, self.raw.get(t.name))
        for vi in self.model.graph.input:
            if vi.name not in self.env:
                self.env[vi.name] = g.add_input(vi.name, self._value_type(vi))
        for node in self.model.graph.node:
            self._convert(node)
        for vi in self.model.graph.output:
            v = self.env.get(vi.name)
            if v is None:
                raise ModelLoadError(f"{self.path}: graph output {vi.name!r} is never computed")
            if v.name != vi.name:  # an output that aliases an input, a weight or another output
                v = g.add_node("identity", [v], output_names=[vi.name])[0]
            g.outputs.append(v)
        return g

    # Values --------------------------------------------------------------------------------
    def _value_type(self, vi) -> TensorType:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ModelLoadError(f"{self.path}: input {vi.name!r} is not a tensor")
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                name = d.dim_param or f"{vi.name}.d{i}"
                dims.append(self.dims.get(name, Sym.var(name)))
        return TensorType(tuple(dims), onnx_dtype(self.path, tt.elem_type, f"input {vi.name!r}"))

    def _initializer(self, t, raw: tuple[int, int] | None) -> None:
        """`raw`: where the tensor's inline bytes are in the model file, or None."""
        from onnx import TensorProto, numpy_helper

        dtype = onnx_dtype(self.path, t.data_type, f"initializer {t.name!r}").numpy()
        shape = tuple(int(d) for d in t.dims)
        store = self.graph.store
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            base = self.path.parent.resolve()
            file = (base / info.get("location", "")).resolve()
            if base not in file.parents:
                raise ModelLoadError(f"{self.path}: initializer {t.name!r} points outside the "
                                     f"model's folder ({info.get('location')!r})")
            if not file.is_file():
                raise ModelLoadError(f"{self.path}: initializer {t.name!r} stores its data in "
                                     f"{file}, which does not exist")
            length = int(info["length"]) if "length" in info else None
            store.add_from_file(t.name, file, int(info.get("offset", 0)), length, dtype, shape)
            self.env[t.name] = self.graph.add_param(t.name)
        elif raw is not None and raw[1]:
            store.add_from_file(t.name, self.path, raw[0], raw[1], dtype, shape)
            self.env[t.name] = self.graph.add_param(t.name)
        else:
            self.env[t.name] = self.graph.add_param(t.name, numpy_helper.to_array(t))

    # Nodes ---------------------------------------------------------------------------------
    def _convert(self, node) -> None:
        self.node, self.created, self.scope = node, [], _scope(node)
        inputs = []
        for name in node.input:
            if name and name not in self.env:
                self.fail(f"input {name!r} is not defined before this node")
            inputs.append(self.env[name] if name else None)
        while inputs and inputs[-1] is None:
            inputs.pop()
        attrs = {self._attr_key(node, a): self._attr_value(a) for a in node.attribute}
        fn = CONVERTERS[_op_key(node)]
        try:
            inspect.signature(fn).bind(self, *inputs, **attrs)
        except TypeError as e:
            self.fail(f"unsupported inputs or attributes ({e})")
        try:
            outs = fn(self, *inputs, **attrs)
        except LlmcError:
            raise
        except (TypeError, ValueError, KeyError, IndexError) as e:
            self.fail(str(e))
        outs = [outs] if isinstance(outs, Value) else list(outs)
        for i, name in enumerate(node.output):
            if not name:
                continue
            if i >= len(outs):
                self.fail(f"output {i} ({name!r}) is not supported")
            v = outs[i]
            if any(v is c for c in self.created) and v.kind == "node":
                self.graph.rename(v, name)
            self.env[name] = v

    @staticmethod
    def _attr_key(node, attr) -> str:
        return f"{attr.name}_attr" if (node.op_type, attr.name) in RENAMED_ATTRS else attr.name

    def _attr_value(self, attr):
        from onnx import AttributeProto, helper, numpy_helper

        if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
            self.fail(f"attribute {attr.name!r} holds a subgraph, which is not supported")
        value = helper.get_attribute_value(attr)
        if attr.type == AttributeProto.TENSOR:
            return numpy_helper.to_array(value)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list):
            return [v.decode() if isinstance(v, bytes) else v for v in value]
        return value

    # The context converters use -------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return sum(1 for o in self.node.output if o)

    def fail(self, reason: str):
        raise ConversionError(self.path, self.node.name or "?", self.node.op_type, reason)

    def _name(self) -> str:
        return self.node.name or self.node.op_type

    def emit(self, op: str, inputs, **attrs) -> Value:
        (out,) = self.emit_multi(op, inputs, **attrs)
        return out

    def emit_multi(self, op: str, inputs, **attrs) -> list[Value]:
        outs = self.graph.add_node(op, list(inputs), attrs, name=self._name(), scope=self.scope)
        self.created.extend(outs)
        return outs

    def const_value(self, array: np.ndarray, name: str | None = None) -> Value:
        return self.graph.add_param(name or f"{self._name()}.const", np.asarray(array))

    def scalar(self, x: float, dtype: DType) -> Value:
        return self.const_value(np.array(x, dtype.numpy()))

    def dtype(self, elem_type: int) -> DType:
        return onnx_dtype(self.path, elem_type, f"node {self.node.name!r}")

    def const_ints(self, v: Value) -> list[int]:
        s = v.sym
        values = list(s) if isinstance(s, tuple) else [s]
        if s is None or not all(isinstance(x, int) for x in values):
            self.fail(f"input {v.name!r} must be a constant")
        return values
