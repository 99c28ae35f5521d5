"""Fuse what surrounds attention into its two neighbours.

Before: the projections are split into heads (reshape + transpose), q and k RMS-normalized
(Qwen3, Gemma 3: each head; OLMo 2: the whole projection; most families: not at all) and
rotated, k and v appended to the cache (or written into a static one at given positions, and read whole or
through a slice), and after attention the heads are merged back (transpose + reshape).
After: `rope_cache` takes the projections as the GEMM wrote them ([batch, seq, heads*head_dim])
and does the split, the q/k norms, the rotation and the cache write in one kernel; attention writes its output
with the heads already merged.
"""

from __future__ import annotations

import itertools

from .manager import rule_pass
from .pattern import Const, Op, Rule, Var

TO_HEADS = {"perm": (0, 2, 1, 3)}


def _heads(name, norm="", **kwargs):
    """x [batch, seq, heads*dim] -> [batch, heads, seq, dim], RMS-normalized before the split
    (norm "all"), after it (norm "head") or after the transpose (norm "head_t")."""
    def normed(x, shared=False):
        return Op("rms_norm", x, Const(f"{name}_w"), bind=f"{name}_norm", shared=shared)
    x = Op("reshape", normed(Var(name)) if norm == "all" else Var(name), Var(f"{name}_shape"), bind=f"{name}_split")
    x = normed(x) if norm == "head" else x
    if norm == "head_t":  # the norm is the head split's last op (bound as the norm: it comes with a rotation)
        return normed(Op("transpose", x, attrs=TO_HEADS), kwargs.get("shared", False))
    return Op("transpose", x, attrs=TO_HEADS, **kwargs)


def _variants():
    # the q/k norms (first: a variant without them would take a normalized q as the projection)
    # come with a rotation in every family that has them
    for norm, rotary, cached, masked in itertools.product(("head", "head_t", "all", ""), (1, 0),
                                                          ("kv_append", "kv_write", "kv_write_read", None), (1, 0)):
        if norm and not rotary:
            continue
        # without a cache, the keys and values may be graph outputs too (a functional cache
        # that starts empty): rope_cache's k and v outputs then stand in for them
        q, v = _heads("q", norm), _heads("v", bind="v_heads", shared=not cached)
        k = _heads("k", norm, bind="k_heads", shared=not (cached or rotary))
        if rotary:
            q = Op("rotary", q, Var("cos"), Var("sin"), bind="q_rot")
            k = Op("rotary", k, Var("cos"), Var("sin"), bind="k_rot", shared=not cached)
        if cached == "kv_append":  # the caches are graph outputs: their values stay, produced by rope_cache
            k = Op("kv_append", Var("past_k"), k, shared=True, bind="k_cache")
            v = Op("kv_append", Var("past_v"), v, shared=True, bind="v_cache")
        elif cached:  # a static cache, written at given positions (and read through a slice: a prefill's)
            k = Op("kv_write", Var("past_k"), Var("positions"), k, shared=True, bind="k_cache")
            v = Op("kv_write", Var("past_v"), Var("positions"), v, shared=True, bind="v_cache")
            if cached == "kv_write_read":
                k = Op("slice", k, bind="k_read", rest=True)
                v = Op("slice", v, bind="v_read", rest=True)
        args = (q, k, v, Var("mask")) if masked else (q, k, v)
        yield Op("attention", *args, bind="attn")


def _fits(m) -> str | None:
    if "q_rot" in m.nodes and m.nodes["q_rot"].attrs != m.nodes["k_rot"].attrs:
        return "q and k rotate different parts of the head"
    for name in ("q", "k", "v"):
        x, split = m[name], m.nodes[f"{name}_split"].outputs[0]
        if x.type.rank != 3 or split.type.rank != 4 or not isinstance(split.shape[2], int) \
                or split.shape[:2] != x.shape[:2]:
            return f"{split.name} does not split {x.name} [batch, seq, hidden] into heads"
    return _norms_fit(m) if "q_norm" in m.nodes else None


def _norms_fit(m) -> str | None:
    q, k = m.nodes["q_norm"], m.nodes["k_norm"]
    if q.attrs["epsilon"] != k.attrs["epsilon"]:
        return f"{q.name} and {k.name} have different epsilons"
    for norm in (q, k):
        x = norm.inputs[0]
        if norm.attrs["axis"] not in (-1, x.type.rank - 1):
            return f"{norm.name} normalizes from axis {norm.attrs['axis']}, not the last"
    return None


def _qk_norm(m) -> dict:
    if "q_norm" not in m.nodes:
        return {}
    per_head = m.nodes["q_norm"].inputs[0].type.rank == 4
    return dict(qk_norm="head" if per_head else "all", norm_epsilon=m.nodes["q_norm"].attrs["epsilon"])


def _build(m, b):
    heads = m.nodes["q_split"].outputs[0].shape[2]
    kv_heads = m.nodes["k_split"].outputs[0].shape[2]
    inputs = [m["q"], m["k"], m["v"], m.values.get("cos"), m.values.get("sin"),
              m.values.get("past_k"), m.values.get("past_v"), m.values.get("positions"),
              m.values.get("q_w"), m.values.get("k_w")]
    rotary_dim = m.nodes["q_rot"].attrs["rotary_dim"] if "q_rot" in m.nodes else 0
    q, k, v = b.emit_multi("rope_cache", inputs, heads=heads, kv_heads=kv_heads, rotary_dim=rotary_dim,
                           **_qk_norm(m))
    attn = m.nodes["attn"]
    k_read, v_read = ([b.emit("slice", [c, *m.nodes[read].inputs[1:]], **m.nodes[read].attrs)
                       for c, read in ((k, "k_read"), (v, "v_read"))] if "k_read" in m.nodes else (k, v))
    y = b.emit("attention", [q, k_read, v_read] + attn.inputs[3:], **attn.attrs)
    new = {attn.outputs[0]: y}
    if "k_cache" in m.nodes:
        new[m.nodes["k_cache"].outputs[0]] = k
        new[m.nodes["v_cache"].outputs[0]] = v
    else:
        new[m.nodes["k_rot" if "k_rot" in m.nodes else "k_heads"].outputs[0]] = k
        new[m.nodes["v_heads"].outputs[0]] = v
    return new


def _merge_fits(m) -> str | None:
    y, out = m.nodes["attn"].outputs[0], m.nodes["out"].outputs[0]
    b, h, s, d = y.shape
    return None if out.shape == (b, s, h * d) else f"{out.name} does not merge the heads of {y.name}"


def _merge(m, b):
    attn = m.nodes["attn"]
    return b.emit("attention", attn.inputs, **{**attn.attrs, "merge_heads": 1})


def _merge_rule():
    inner = Op("attention", Var("q"), Var("k"), Var("v"), bind="attn", rest=True,
               attrs={"merge_heads": 0})
    return Rule("merge_heads", Op("reshape", Op("transpose", inner, attrs=TO_HEADS), Var("s"), bind="out"),
                _merge, check=_merge_fits)


RULES = [Rule("rope_cache", p, _build, check=_fits, near_miss_depth=4) for p in _variants()]
RULES.append(_merge_rule())

fuse_attention_io = rule_pass("fuse_attention_io", RULES)
