"""Norms on their own as TVM kernels (TE definitions, lowered with the injective ops): layer_norm
and rms_norm over the last axis, add_norm (the residual sum and its norm) and norm_add (a
residual plus a norm: post-norm). Most norms are
GEMM prologues (`linear.py`); these are the ones whose output is read by more than GEMMs. The
OpenCL/Metal schedule of the same definitions is `gpu/norm.py`.
"""

from __future__ import annotations


def norm(node, ins, out_shape, dims):
    """layer_norm / rms_norm over the last axis, on their own (most norms are GEMM prologues;
    these are the ones whose output is read by more than GEMMs)."""
    x, scale, *bias = ins
    return normalized(node, lambda *i: x(*i), x.shape, scale, bias, out_shape, node.op == "layer_norm")


def add_norm(node, ins, out_shapes, dims):
    """add_norm: the residual sum s = a + b (the first output) and norm(s) (the second). The
    norm reads a + b itself, not s: a kernel then never reads what it writes."""
    from tvm import te

    a, b, scale, *bias = ins
    s = te.compute(out_shapes[0], lambda *i: a(*i) + b(*i), name="sum")
    return [s, normalized(node, lambda *i: a(*i) + b(*i), a.shape, scale, bias, out_shapes[1],
                           node.attrs["norm"] == "layer")]


def norm_add(node, ins, out_shape, dims):
    """norm_add: residual + norm(x), the residual added in the norm's last stage."""
    residual, x, scale, *bias = ins
    return normalized(node, lambda *i: x(*i), x.shape, scale, bias, out_shape, node.attrs["norm"] == "layer",
                      residual)


def normalized(node, x, shape, scale, bias, out_shape, centered: bool, residual=None):
    """norm(x) over the last axis of `shape`: rms, or layer (`centered`) with its bias; plus
    `residual` when given."""
    from tvm import te, tirx

    k = shape[-1]
    dt = scale.dtype
    n = k.astype(dt)
    if centered:
        r = te.reduce_axis((0, k), name="r")
        total = te.compute(shape[:-1], lambda *i: te.sum(x(*i, r), axis=r), name="total")
    dev = (lambda *i: x(*i) - total(*i[:-1]) / n) if centered else x
    r2 = te.reduce_axis((0, k), name="r2")
    squares = te.compute(shape[:-1], lambda *i: te.sum(dev(*i, r2) * dev(*i, r2), axis=r2), name="squares")
    eps = tirx.const(node.attrs["epsilon"], dt)
    inv = te.compute(shape[:-1], lambda *i: 1 / te.sqrt(squares(*i) / n + eps), name="inv")

    def body(*i):
        y = dev(*i) * inv(*i[:-1]) * scale(i[-1])
        y = y + bias[0](i[-1]) if bias else y
        return y + residual(*i) if residual is not None else y
    return te.compute(out_shape, body, name="normed")


NORMS = {"layer_norm": norm, "rms_norm": norm, "add_norm": add_norm, "norm_add": norm_add}
