"""Recognize LayerNorm and RMSNorm written out as primitive ops.

    RMSNorm:   w * (x * 1/sqrt(mean(x^2, -1) + eps))
    LayerNorm: (d * 1/sqrt(mean(d^2, -1) + eps)) * w + b,  d = x - mean(x, -1)

(after canonicalization, every division is a multiplication by a reciprocal); in half precision
the RMSNorm is computed in float32 between two casts, and the op computes in float32 too. The weight must be
a constant of the normalized size and eps a small constant; anything else is left alone, with
the reason reported as a near miss. A slice of a norm's rows is taken before the norm.
"""

from __future__ import annotations

from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

X = Var("x")
LAST = {"axes": lambda a: a in ((-1,), ), "keepdims": 1}


def _eps(data) -> str | None:
    return None if data.size == 1 and 0 < float(data.reshape(-1)[0]) < 1e-2 else \
        f"epsilon {data.reshape(-1)[:2]} is not a small positive scalar"


def _inv_rms(v):
    """1/sqrt(mean(v^2, -1) + eps)"""
    return Op("reciprocal", Op("sqrt", Op("add", Op("reduce_mean", Op("pow", v, Const("two", value=2.0)),
                                                    attrs=LAST), Const("eps", where=_eps))))


def _weight_fits(m) -> str | None:
    x = m["x"]
    for name in ("w", "b"):
        if name in m.values and tuple(m[name].shape) != (x.shape[-1],):
            return f"{name} {m[name].type} is not one value per feature of {x.type}"
    return None


def _eps_value(m) -> float:
    return float(m.data("eps").reshape(-1)[0])


def _rms(m, b):
    return b.emit("rms_norm", [m["x"], m["w"]], epsilon=_eps_value(m))


def _layer(m, b):
    return b.emit("layer_norm", [m["x"], m["w"], m["b"]], epsilon=_eps_value(m))


CENTERED = Op("sub", X, Op("reduce_mean", X, attrs=LAST), shared=True)
# Half precision: HF computes the norm in float32 between two casts.
X32 = Op("cast", X, attrs={"to": lambda t: t.value == "f32"}, shared=True)


def _round_trip(m) -> str | None:
    back = m.nodes["back"]
    if back.attrs["to"] != m["x"].dtype:
        return f"{back.name} casts to {back.attrs['to']}, not back to {m['x'].dtype}"
    return _weight_fits(m)

RULES = [
    Rule("rms_norm", Op("mul", Op("mul", X, _inv_rms(X)), Const("w")), _rms, check=_weight_fits,
         near_miss_depth=3),
    Rule("rms_norm", Op("mul", Op("cast", Op("mul", X32, _inv_rms(X32)), bind="back"), Const("w")), _rms,
         check=_round_trip, near_miss_depth=4),
    Rule("layer_norm", Op("add", Op("mul", Op("mul", CENTERED, _inv_rms(CENTERED)), Const("w")), Const("b")),
         _layer, check=_weight_fits, near_miss_depth=4),
]



def _rows_only(m) -> str | None:
    x, axes = m["x"], m["axes"].sym
    last = x.type.rank - 1
    if axes is None or any(a % x.type.rank == last for a in (axes if isinstance(axes, tuple) else (axes,))):
        return "the slice cuts the normalized axis"
    return None


def _slice_first(m, b):
    norm, cut = m.nodes["norm"], m.nodes["slice"]
    rows = b.emit("slice", [m["x"]] + cut.inputs[1:])
    return b.emit(norm.op, [rows] + norm.inputs[1:], **norm.attrs)


# norm(x)[:, -1:] -> norm(x[:, -1:]): a norm works row by row, so the rows a slice keeps can be
# cut first (generation's last-position logits), and the norm then joins the GEMM after it.
RULES += [Rule("slice_before_norm", Op("slice", Op(op, X, rest=True, bind="norm"), Var("starts"), Var("ends"),
                                       Var("axes"), rest=True, bind="slice"), _slice_first, check=_rows_only)
          for op in ("rms_norm", "layer_norm")]

recognize_norms = rule_pass("recognize_norms", RULES)
