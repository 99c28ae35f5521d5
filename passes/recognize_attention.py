"""Recognize scaled-dot-product attention as one `attention` op.

What exporters write for `F.scaled_dot_product_attention` (and eager attention) is, up to
where the scale is applied and whether a NaN guard follows the softmax:

    s = (q * a) @ (k^T * b)          or   (q @ k^T) * a   or   q @ k^T
    s = tanh(s) * c                  (optional: Gemma 2's soft-capping, a = scale / c)
    p = softmax(s + mask, -1)        (mask optional: additive, [batch, 1, seq, kv])
    p = where(isnan(p), 0, p)        (optional: fully masked rows give zeros)
    y = p @ v

k^T may be spelled as a transpose or, after canonicalization, any chain that swaps the last two
axes. Keys and values repeated for grouped-query attention (unsqueeze -> expand -> reshape) are
read before the repeat: the attention op takes fewer key/value heads than query heads. A
scalar factor on the queries of an attention op joins its scale.
"""

from __future__ import annotations

import itertools
import math

from .canonicalize import RULES as CANONICAL_RULES
from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

Q, KT, V, MASK = Var("q"), Var("kt"), Var("v"), Var("mask")


def _scalar(name):
    return Const(name, where=lambda d: None if d.size == 1 else "scale is not a scalar")


def _variants():
    last = {"axis": lambda a: a in (-1, 3)}
    # most specific first: a variant without a scale would take `k * scale` for k^T
    for q_scale, k_scale, s_scale, capped, masked, guarded in itertools.product((1, 0), repeat=6):
        if s_scale and (q_scale or k_scale):
            continue
        q = Op("mul", Q, _scalar("qs")) if q_scale else Q
        kt = Op("mul", KT, _scalar("ks")) if k_scale else KT
        s = Op("matmul", q, kt)
        if s_scale:
            s = Op("mul", s, _scalar("ss"))
        if capped:
            s = Op("mul", Op("tanh", s), _scalar("cap"))
        if masked:
            s = Op("add", s, MASK)
        # the guard reads the softmax twice: its two uses are both inside the pattern
        p = Op("softmax", s, attrs=last, shared=guarded)
        if guarded:
            p = Op("where", Op("is_nan", p, shared=True), Const("zero", value=0.0), p)
        yield Op("matmul", p, V)


# GQA: x[b, kv, t, d] -> unsqueeze(2) -> expand [b, kv, n, t, d] -> reshape [b, kv*n, t, d]
def _repeat(name):
    return Op("reshape", Op("expand", Op("unsqueeze", Var(name), attrs={"axes": (2,)}), Var(f"{name}_e")),
              Var(f"{name}_r"), bind=f"{name}_rep")


def _repeat_fits(name):
    def check(m) -> str | None:
        kv, out = m[name], m.nodes[f"{name}_rep"].outputs[0]
        b, h, t, d = kv.shape
        if out.shape[0] != b or out.shape[2:] != (t, d) or not isinstance(out.shape[1], int) \
                or not isinstance(h, int) or out.shape[1] % h:
            return f"{out.name} does not repeat the heads of {kv.name}"
        return None
    return check


def _fits(m) -> str | None:
    q, kt, v = m["q"], m["kt"], m["v"]
    if q.type.rank != 4 or kt.type.rank != 4 or v.type.rank != 4:
        return "q, k, v are not [batch, heads, seq, head_dim]"
    if "mask" in m.values and m["mask"].type.rank != 4:
        return f"mask {m['mask'].type} is not 4-D"
    return None


def _build(m, b):
    scales = [float(m.data(n).reshape(-1)[0]) for n in ("qs", "ks", "ss") if n in m.values]
    cap = float(m.data("cap").reshape(-1)[0]) if "cap" in m.values else 0.0
    k = b.emit("transpose", [m["kt"]], perm=(0, 1, 3, 2))
    return b.emit("attention", [m["q"], k, m["v"], m.values.get("mask")],
                  scale=(math.prod(scales) if scales else 1.0) * (cap or 1.0), is_causal=0, softcap=cap)


def _unrepeat(slot):
    def build(m, b):
        node = m.nodes["attn"]
        inputs = list(node.inputs)
        inputs[slot] = m["kv"]
        return b.emit("attention", inputs, **node.attrs)
    return build


def _strip_rule(slot, with_mask):
    args = [Var("q"), Var("k"), Var("v")] + ([Var("mask")] if with_mask else [])
    args[slot] = _repeat("kv")
    return Rule("gqa_repeat", Op("attention", *args, bind="attn"), _unrepeat(slot),
                check=_repeat_fits("kv"))


def _fold_scale(m, b):
    """attention(q * c, k, v) -> attention(q, k, v) with its scale times c (OPT scales the
    queries before calling SDPA)."""
    node = m.nodes["attn"]
    q = m["q"]
    scale = node.attrs["scale"] if node.attrs["scale"] is not None else 1 / math.sqrt(q.shape[-1])
    return b.emit("attention", [q] + node.inputs[1:],
                  **{**node.attrs, "scale": scale * float(m.data("c").reshape(-1)[0])})


RULES = [Rule("attention", pattern, _build, check=_fits) for pattern in _variants()]
RULES.append(Rule("attention_scale", Op("attention", Op("mul", Var("q"), _scalar("c")), Var("k"), Var("v"),
                                        bind="attn", rest=True), _fold_scale))
# k = transpose(transpose(k)): what the rewrite leaves when the export transposed k for q @ k^T.
RULES += [r for r in CANONICAL_RULES if r.name == "transpose_transpose"]
RULES += [_strip_rule(slot, mask) for slot in (1, 2) for mask in (False, True)]

recognize_attention = rule_pass("recognize_attention", RULES)
