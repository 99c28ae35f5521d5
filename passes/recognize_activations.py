"""Recognize activations written out as primitive ops: SiLU and GELU (erf and tanh forms)."""

from __future__ import annotations

import math

from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

X = Var("x")


def c(value):
    return Const(f"c{value}", value=value)


def _gelu(approximate):
    return lambda m, b: b.emit("gelu", [m["x"]], approximate=approximate)


# 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (GPT-2's "gelu_new", Phi)
_TANH_INNER = Op("tanh", Op("mul", Op("add", X, Op("mul", Op("pow", X, c(3.0)), c(0.044715))),
                            c(math.sqrt(2 / math.pi))))
# 0.5 * x * (1 + erf(x / sqrt(2)))
_ERF_INNER = Op("erf", Op("mul", X, c(1 / math.sqrt(2))))

RULES = [
    Rule("silu", Op("mul", X, Op("sigmoid", X)), lambda m, b: b.emit("silu", [m["x"]])),
]
for name, inner, approx in (("gelu_tanh", _TANH_INNER, "tanh"), ("gelu_erf", _ERF_INNER, "none")):
    one_plus = Op("add", inner, c(1.0))
    RULES += [
        Rule(name, Op("mul", Op("mul", X, c(0.5)), one_plus), _gelu(approx)),   # (0.5 x)(1 + .)
        Rule(name, Op("mul", Op("mul", X, one_plus), c(0.5)), _gelu(approx)),   # (x (1 + .)) 0.5
        Rule(name, Op("mul", X, Op("mul", one_plus, c(0.5))), _gelu(approx)),   # x ((1 + .) 0.5)
    ]

recognize_activations = rule_pass("recognize_activations", RULES)
