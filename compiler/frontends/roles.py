"""What each input and output of a decoder is for, found from how the graph uses it.

Exporters name things as they like: `past_key_values.0.key` or `past_key_0`, keys before values
or interleaved, `batch_size`/`sequence_length` or `batch`/`seq` for the dims, no `position_ids`
at all. Names are only hints here; the roles come from the structure:

- the token ids index the table whose rows are the logits' width (the vocabulary);
- each layer's past is a float input that a concat extends along its sequence axis, and the
  concat's result (or an alias of it) is a graph output: that layer's present;
- the positions are the integer input that feeds the rotary angles (sin/cos) or indexes a
  position table; the attention mask is the other one;
- the logits are the first float output that is not a present.

The dims are then bound to their roles: the token ids give batch and seq, a past gives past, and
the mask's length is total (= past + seq at run time). `Roles.dims` maps the exporter's dim
names onto those; the importer reads the file again with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelLoadError
from ..ir.graph import Graph, Value
from ..ir.symbolic import Sym

# Ops that carry a tensor's role through unchanged (a cast, a view of it; a slice: Mistral's
# exports keep the past's last window positions, all of them when the context is shorter).
_CARRY = {"cast", "unsqueeze", "squeeze", "reshape", "identity", "flatten", "expand", "slice"}


@dataclass
class Roles:
    tokens: str
    logits: str
    mask: str | None = None
    positions: str | None = None
    caches: list[tuple[str, str]] = field(default_factory=list)  # (past input, present output)
    dims: dict[str, Sym | int] = field(default_factory=dict)  # the exporter's dim name -> its role's dim

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "mask": self.mask, "positions": self.positions, "logits": self.logits}


def _reach(users, v: Value):
    """(node, input) pairs where `v` is used, looking through casts and views."""
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        for n in users.get(x, []):
            if (n.op in _CARRY or (n.op == "concat" and len(n.inputs) == 1)) and n.inputs[0] is x:
                if n.outputs[0] not in seen:
                    seen.add(n.outputs[0])
                    todo.append(n.outputs[0])
            else:
                yield n, x


def _aliases(users, v: Value) -> set[Value]:
    out, todo = {v}, [v]
    while todo:
        x = todo.pop()
        for n in users.get(x, []):
            if n.op in ("identity", "slice") and n.inputs[0] is x:  # a slice: the window, as above
                out.add(n.outputs[0])
                todo.append(n.outputs[0])
    return out


def _atom(d) -> str | None:
    """The name of a dim that is one named dim (`seq`), else None (`2*seq`, `past + seq`, 8)."""
    if isinstance(d, Sym) and len(d.terms) == 1:
        ((monomial, coeff),) = d.terms.items()
        if coeff == 1 and len(monomial) == 1:
            return monomial[0]
    return None


def prompt_feeds(graph: Graph, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for `graph` (with `graph.metadata["roles"]`) running a prompt of token ids
    [1, n] from an empty cache: the mask all ones, positions 0 .. n-1, the pasts empty."""
    n = tokens.shape[1]
    roles = graph.metadata["roles"]
    by_role = {roles["tokens"]: tokens, roles["mask"]: np.ones((1, n)), roles["positions"]: np.arange(n)[None]}
    env = {"batch": 1, "seq": n, "past": 0, "total": n}
    return {v.name: by_role[v.name].astype(v.dtype.numpy()) if v.name in by_role else
            np.zeros(v.type.concrete(env), v.dtype.numpy()) for v in graph.inputs}


def find_roles(graph: Graph, path) -> Roles:
    """The roles of `graph`'s inputs and outputs; ModelLoadError naming the file and the role
    that cannot be found, and why."""
    users = graph.consumers()
    outputs = set(graph.outputs)

    def fail(role: str, why: str):
        raise ModelLoadError(f"{path}: cannot find the {role}: {why}")

    caches, concat_axis = [], {}
    for v in graph.inputs:
        if not v.dtype.is_float:
            continue
        for n, x in _reach(users, v):
            if n.op == "concat" and n.inputs[0] is x and _aliases(users, n.outputs[0]) & outputs:
                present = next(o for o in graph.outputs if o in _aliases(users, n.outputs[0]))
                caches.append((v, present))
                concat_axis[v] = (n.attrs["axis"] % v.type.rank, n.inputs[1].shape)
                break
    presents = {p for _, p in caches}
    float_outputs = [o for o in graph.outputs if o.dtype.is_float and o not in presents]
    if not float_outputs:
        fail("logits", "the graph has no floating-point output besides the KV cache")
    logits = float_outputs[0]
    vocab = logits.shape[-1]

    integer = [v for v in graph.inputs if not v.dtype.is_float]
    tables = {}  # integer input -> rows of the constant tables it indexes
    angles = set()  # integer inputs that feed sin/cos (rotary angles)
    for v in integer:
        for n, x in _reach(users, v):
            if n.op == "gather" and n.inputs[1] is x and graph.const_value(n.inputs[0]) is not None:
                tables.setdefault(v, []).append(graph.const_value(n.inputs[0]).shape[0])
        if _feeds_angles(users, v):
            angles.add(v)
    by_vocab = [v for v in integer if vocab in tables.get(v, [])]
    tokens = by_vocab[0] if len(by_vocab) == 1 else \
        next((v for v in by_vocab or integer if "input_ids" in v.name or "token" in v.name), None)
    if tokens is None:
        fail("token ids", f"no integer input indexes a table of {vocab} rows (the logits' width)")
    if tokens.type.rank != 2:
        fail("token ids", f"input {tokens.name!r} is {tokens.type}, not [batch, seq]")
    rest = [v for v in integer if v is not tokens and users.get(v)]
    positions, masks = _positions_and_mask(rest, tokens, lambda v: v in angles or v in tables)
    if len(positions) > 1 or len(masks) > 1:
        fail("attention mask and positions", f"inputs {[v.name for v in positions + masks]} are all "
             "[batch, ...] integers, and neither their shapes, their uses nor their names tell which is which")
    float_inputs = [v for v in graph.inputs if v.dtype.is_float and v not in dict(caches) and users.get(v)]
    if float_inputs:
        raise ModelLoadError(f"{path}: input {float_inputs[0].name!r} has no role llmc knows: a float input must "
                             "be a layer's past, which a concat extends into an output (its present)")
    roles = Roles(tokens=tokens.name, logits=logits.name, mask=masks[0].name if masks else None,
                  positions=positions[0].name if positions else None,
                  caches=[(p.name, q.name) for p, q in caches])
    roles.dims = _bind_dims(tokens, masks[0] if masks else None, [(p, *concat_axis[p]) for p, _ in caches], fail)
    return roles


def _positions_and_mask(rest, tokens, feeds_positions):
    """Split the other integer inputs into positions and mask: by shape where a cache makes the
    mask longer than the tokens ([batch, total] against [batch, seq]), else by use (positions
    feed the rotary angles or index a table), else by name."""
    by_shape = (lambda v: v.shape == tokens.shape) if any(v.shape != tokens.shape for v in rest) else None
    for split in filter(None, (by_shape, feeds_positions, lambda v: "position" in v.name)):
        positions = [v for v in rest if split(v)]
        masks = [v for v in rest if not split(v)]
        if len(positions) <= 1 and len(masks) <= 1:
            return positions, masks
    return positions, masks


def _feeds_angles(users, v) -> bool:
    """Whether integer input `v` reaches sin/cos (rotary angles), through any computation."""
    seen, todo = set(), [v]
    while todo:
        x = todo.pop()
        for n in users.get(x, []):
            if n.op in ("sin", "cos"):
                return True
            for o in n.outputs:
                if o not in seen:
                    seen.add(o)
                    todo.append(o)
    return False


def _bind_dims(tokens: Value, mask: Value | None, pasts, fail) -> dict[str, Sym | int]:
    batch, seq = tokens.shape
    if _atom(seq) is None:
        fail("sequence dim", f"token ids {tokens.name!r} have the fixed shape {list(tokens.shape)}; "
             "export with dynamic batch and sequence axes")
    dims = {_atom(seq): Sym.var("seq")}
    if _atom(batch):
        dims[_atom(batch)] = Sym.var("batch")
    for past, axis, new in pasts:
        name = _atom(past.shape[axis])
        if name is None:
            fail("past length", f"cache input {past.name!r} has the fixed shape {list(past.shape)}")
        dims.setdefault(name, Sym.var("past"))
        # a head dim left symbolic (onnxruntime-genai's `kv_cache_dim`) is the new keys' one
        for i, (d, known) in enumerate(zip(past.shape, new)):
            if i not in (0, axis) and _atom(d) and isinstance(known, int):
                dims.setdefault(_atom(d), known)
    if mask is not None and mask.type.rank == 2:
        name = _atom(mask.shape[1])
        if name is not None and name not in dims:
            dims[name] = Sym.var("total")
    return dims
