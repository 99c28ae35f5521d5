"""Recognize rotary position embeddings as Llama, NeoX and Phi write them:

    x * cos + concat(-x[..., d/2:], x[..., :d/2]) * sin   ->   rotary(x, cos, sin)

Partial rotary (NeoX, Phi: only the first d features of each head rotate) is then
concat(rotary(x[..., :d]), x[..., d:]) and becomes rotary(x) {rotary_dim=d}.
"""

from __future__ import annotations

from .manager import rule_pass
from .pattern import Op, Rule, Var

X, COS, SIN = Var("x"), Var("cos"), Var("sin")
ROTATE_HALF = Op("concat", Op("neg", Op("slice", X, Var("s1"), Var("e1"), Var("a1"), Var("p1"), bind="hi")),
                 Op("slice", X, Var("s0"), Var("e0"), Var("a0"), Var("p0"), bind="lo"),
                 attrs={"axis": lambda a: a == -1 or a == 3})


def _halves(m) -> str | None:
    x = m["x"]
    d = x.shape[-1]
    if not isinstance(d, int) or d % 2:
        return f"{x.name} has an odd or unknown last dim"
    lo, hi = m.nodes["lo"].outputs[0], m.nodes["hi"].outputs[0]
    if lo.shape != x.shape[:-1] + (d // 2,) or hi.shape != lo.shape:
        return "the slices are not the two halves of the last axis"
    s0, s1 = m["s0"].sym, m["s1"].sym
    if s0 != (0,) or s1 != (d // 2,):
        return f"slices start at {s0} and {s1}, not 0 and {d // 2}"
    if x.type.rank != 4:
        return f"{x.name} is not [batch, heads, seq, head_dim]"
    return None


def _rotary(m, b):
    return b.emit("rotary", [m["x"], m["cos"], m["sin"]])


def _part(name):
    return Op("slice", X, Var(f"{name}_s"), Var(f"{name}_e"), Var(f"{name}_a"), Var(f"{name}_p"), bind=name)


def _split_fits(m) -> str | None:
    rot, rest, x = m.nodes["rot"].outputs[0], m.nodes["rest"].outputs[0], m["x"]
    d = rot.shape[-1]
    if m["rot_s"].sym != (0,) or m["rest_s"].sym != (d,) or rest.shape[-1] + d != x.shape[-1]:
        return "the slices are not [:d] and [d:] of the head"
    return None


def _partial(m, b):
    inner = m.nodes["inner"]
    return b.emit("rotary", [m["x"]] + inner.inputs[1:], rotary_dim=m.nodes["rot"].outputs[0].shape[-1])


RULES = [Rule("rotary", Op("add", Op("mul", X, COS), Op("mul", ROTATE_HALF, SIN)), _rotary, check=_halves,
              near_miss_depth=4)]

# Partial rotary: concat(rotary(x[..., :d]), x[..., d:]) -> rotary(x) {rotary_dim=d}
RULES.append(Rule("partial_rotary", Op("concat", Op("rotary", _part("rot"), Var("cos"), Var("sin"), bind="inner"),
                                       _part("rest"), attrs={"axis": lambda a: a in (-1, 3)}),
                  _partial, check=_split_fits))

recognize_rotary = rule_pass("recognize_rotary", RULES)
