"""Fuse into each GEMM what surrounds it: its prologue (the norm that feeds it) and its
epilogue (bias, activation, the SwiGLU/GeGLU gate multiply, the residual add).

Every `linear` first becomes a `fused_linear`; each rule then folds one more neighbour in, as
long as that neighbour's value has no other reader.
"""

from __future__ import annotations

from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

SLOTS = ("x", "w", "bias", "residual", "norm_scale", "norm_bias", "w_scale", "w_zero")
PLAIN = {"activation": "", "gated": 0}


def _rebuild(b, node, **changes):
    """`node` (a fused_linear) with some inputs and attributes changed."""
    inputs = dict(zip(SLOTS, list(node.inputs) + [None] * len(SLOTS)))
    attrs = dict(node.attrs)
    for k, v in changes.items():
        (inputs if k in SLOTS else attrs)[k] = v
    return b.emit("fused_linear", [inputs[s] for s in SLOTS], **attrs)


def _to_fused(m, b):
    node = m.nodes["lin"]
    return b.emit("fused_linear", node.inputs)


LIN = Op("fused_linear", Var("x"), rest=True, bind="lin")


def _no_residual(m) -> str | None:
    node = m.nodes["lin"]
    return None if len(node.inputs) < 4 or node.inputs[3] is None else "already has a residual"


def _residual(m, b):
    return _rebuild(b, m.nodes["lin"], residual=m["r"])


def _act(m, name) -> str:
    """The epilogue's activation name; GELU's approximation is part of it."""
    if name == "gelu" and m.nodes["act"].attrs["approximate"] == "tanh":
        return "gelu_tanh"
    return name


def _activation(name):
    return lambda m, b: _rebuild(b, m.nodes["lin"], activation=_act(m, name))


def _halves(m) -> str | None:
    """The split cuts the GEMM's features (its last axis, spelled -1 or by number, as the dynamo
    exporter writes Phi-3's gate_up) into two halves of one width."""
    split = m.nodes["split"]
    rank = split.inputs[0].type.rank
    halves = [out.shape[-1] for out in split.outputs]
    if len(halves) != 2 or halves[0] != halves[1] or split.attrs["axis"] % rank != rank - 1:
        return f"{split.name} does not cut the GEMM output into two equal halves"
    return _no_residual(m)


def _gated(name):
    return lambda m, b: _rebuild(b, m.nodes["lin"], activation=_act(m, name), gated=1)


def _norm_fits(m) -> str | None:
    lin = m.nodes["lin"]
    if lin.attrs["norm"]:
        return "already has a norm"
    norm = m.nodes["norm"]
    if norm.attrs["axis"] not in (-1, norm.outputs[0].type.rank - 1):
        return "the norm is not over the last axis"
    return None


def _prologue(kind):
    def build(m, b):
        norm = m.nodes["norm"]
        changes = dict(x=norm.inputs[0], norm=kind, epsilon=norm.attrs["epsilon"], norm_scale=norm.inputs[1])
        if kind == "layer":
            changes["norm_bias"] = norm.inputs[2] if len(norm.inputs) > 2 else None
        return _rebuild(b, m.nodes["lin"], **changes)
    return build


def _gate_pattern(act_op):
    split_in = Op("fused_linear", Var("x"), rest=True, bind="lin", attrs=PLAIN)
    return Op("mul", Op(act_op, Op("split", split_in, bind="split", output=0, shared=True), bind="act"),
              Op("split", split_in, output=1, shared=True))


RULES = [Rule("to_fused_linear", Op("linear", Var("x"), Const("w"), rest=True, bind="lin"), _to_fused,
              near_miss_depth=9)]
for act_op, name in (("silu", "silu"), ("gelu", "gelu")):
    RULES.append(Rule(f"gated_{name}", _gate_pattern(act_op), _gated(name), check=_halves))
for act_op in ("gelu", "silu", "relu"):
    RULES.append(Rule(f"{act_op}_epilogue", Op(act_op, Op("fused_linear", Var("x"), rest=True, bind="lin",
                                                          attrs=PLAIN), bind="act"),
                      _activation(act_op), check=_no_residual))
def _residual_fits(m) -> str | None:
    if m["r"].shape != m.nodes["lin"].outputs[0].shape:
        return f"{m['r'].name} {m['r'].type} is not a residual of the GEMM's shape"
    return _no_residual(m)


def _bias_fits(m) -> str | None:
    node = m.nodes["lin"]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return "already has a bias"
    return None if tuple(m["b"].shape) == (node.outputs[0].shape[-1],) else "not a bias of the GEMM's width"


def _bias(m, b):
    return _rebuild(b, m.nodes["lin"], bias=m["b"])


# a GEMM imported quantized (MatMulNBits) arrives fused, its bias still a separate Add
RULES.append(Rule("bias_epilogue", Op("add", LIN, Const("b")), _bias, check=_bias_fits))
RULES.append(Rule("residual_epilogue", Op("add", LIN, Var("r")), _residual, check=_residual_fits))


def _chain_fits(m) -> str | None:
    inner = m.nodes["inner"]
    return None if len(inner.inputs) < 4 or inner.inputs[3] is None else "both GEMMs have a residual"


def _chain(m, b):
    """(a + b) + r with a, b GEMM outputs and a's residual b: b takes r as its residual
    (parallel residual: attention + MLP + x, as GPT-NeoX and Phi write it)."""
    inner = _rebuild(b, m.nodes["inner"], residual=m["r"])
    return _rebuild(b, m.nodes["lin"], residual=inner)


RULES.append(Rule("residual_chain", Op("add", Op("fused_linear", Var("x"), Var("w"), Var("bias"),
                                                 Op("fused_linear", Var("x2"), rest=True, bind="inner"),
                                                 rest=True, bind="lin"), Var("r")),
                  _chain, check=_chain_fits))
RULES.append(Rule("rms_norm_prologue", Op("fused_linear", Op("rms_norm", Var("nx"), Var("g"), bind="norm"),
                                          rest=True, bind="lin"), _prologue("rms"), check=_norm_fits))
RULES.append(Rule("layer_norm_prologue", Op("fused_linear", Op("layer_norm", Var("nx"), Var("g"), bind="norm",
                                                               rest=True),
                                            rest=True, bind="lin"), _prologue("layer"), check=_norm_fits))

fuse_linear = rule_pass("fuse_linear", RULES)
