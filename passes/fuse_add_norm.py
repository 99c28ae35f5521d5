"""Fuse a residual add with the norm that reads it: one op, two outputs (the sum, which the
residual stream carries on, and its normalization); and a residual add with the norm it adds
(post-norm: residual + norm(x), one op). Runs after the GEMM fusions, for the adds that did not
become a GEMM's epilogue."""

from __future__ import annotations

from .manager import rule_pass
from .pattern import Op, Rule, Var


def _build(kind):
    def build(m, b):
        norm, add = m.nodes["norm"], m.nodes["add"]
        bias = norm.inputs[2:3] if kind == "layer" else []
        s, y = b.emit_multi("add_norm", [add.inputs[0], add.inputs[1], norm.inputs[1], *bias],
                            norm=kind, epsilon=norm.attrs["epsilon"])
        return {add.outputs[0]: s, norm.outputs[0]: y}
    return build


def _last_axis(m) -> str | None:
    norm = m.nodes["norm"]
    if norm.attrs["axis"] not in (-1, norm.outputs[0].type.rank - 1):
        return "the norm is not over the last axis"
    a, b = m.nodes["add"].inputs
    return None if a.shape == b.shape else "the add broadcasts"


ADD = Op("add", Var("a"), Var("b"), bind="add", shared=True)
RULES = [
    Rule("add_rms_norm", Op("rms_norm", ADD, Var("g"), bind="norm"), _build("rms"), check=_last_axis),
    Rule("add_layer_norm", Op("layer_norm", ADD, Var("g"), bind="norm", rest=True), _build("layer"),
         check=_last_axis),
]



def _post(m, b):
    norm = m.nodes["norm"]
    return b.emit("norm_add", [m["residual"], *norm.inputs], norm="rms" if norm.op == "rms_norm" else "layer",
                  epsilon=norm.attrs["epsilon"])


def _post_fits(m) -> str | None:
    norm = m.nodes["norm"]
    if norm.attrs["axis"] not in (-1, norm.outputs[0].type.rank - 1):
        return "the norm is not over the last axis"
    return None if m["residual"].shape == norm.outputs[0].shape else "the add broadcasts"


# Post-norm (OLMo 2, Gemma 2/3's sandwich): the residual plus a normalized GEMM output. The norm
# needs the whole row of the GEMM's output, so it cannot be the GEMM's epilogue: it takes the add.
RULES += [Rule(f"{op}_add", Op("add", Var("residual"), Op(op, Var("x"), rest=True, bind="norm")), _post,
               check=_post_fits) for op in ("rms_norm", "layer_norm")]

fuse_add_norm = rule_pass("fuse_add_norm", RULES)
