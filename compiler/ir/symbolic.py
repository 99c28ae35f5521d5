"""Symbolic dimensions: integer polynomials over named dims (`batch`, `seq`, `past`, ...).

Exporters compute shapes at run time (Shape -> Gather -> Concat -> Reshape), and a reshape to
`[batch * seq, hidden]` or a concat to `past + seq` must keep its meaning in the IR. A `Sym` is a
canonical sum of monomials with integer coefficients, so `seq + past` and `past + seq` are the
same object and compare equal. Anything that is not a polynomial (a max of two unrelated dims, an
inexact division) becomes a fresh opaque atom named after the expression.

A dim is a plain `int` or a `Sym`; arithmetic that folds to a constant returns an `int`.
"""

from __future__ import annotations

import contextlib
from typing import Union

Dim = Union[int, "Sym"]


class Sym:
    __slots__ = ("terms", "_hash")

    def __init__(self, terms: dict[tuple[str, ...], int]):
        # terms: monomial (sorted tuple of atom names, with repeats) -> coefficient, no zeros.
        self.terms = {m: c for m, c in terms.items() if c != 0}
        self._hash = hash(frozenset(self.terms.items()))

    @staticmethod
    def var(name: str) -> "Sym":
        return Sym({(name,): 1})

    # Arithmetic ------------------------------------------------------------------------------
    def __add__(self, other: Dim) -> Dim:
        terms = dict(self.terms)
        for m, c in _terms(other).items():
            terms[m] = terms.get(m, 0) + c
        return _make(terms)

    __radd__ = __add__

    def __neg__(self) -> Dim:
        return _make({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: Dim) -> Dim:
        return self + (-as_sym(other))

    def __rsub__(self, other: Dim) -> Dim:
        return as_sym(other) + (-self)

    def __mul__(self, other: Dim) -> Dim:
        terms: dict[tuple[str, ...], int] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in _terms(other).items():
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return _make(terms)

    __rmul__ = __mul__

    def __floordiv__(self, other: Dim) -> Dim:
        return div(self, other)

    def __rfloordiv__(self, other: Dim) -> Dim:
        return div(other, self)

    # Comparison ------------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        if isinstance(other, Sym):
            return self.terms == other.terms
        return False  # a Sym never folds to a constant, so it is never equal to an int

    def __hash__(self) -> int:
        return self._hash

    @property
    def atoms(self) -> set[str]:
        return {a for m in self.terms for a in m}

    def evaluate(self, env: dict[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            p = c
            for a in m:
                if a not in env:
                    raise KeyError(f"symbolic dim {a!r} has no value")
                p *= env[a]
            total += p
        return total

    def __str__(self) -> str:
        parts = []
        for m, c in sorted(self.terms.items(), key=lambda mc: (len(mc[0]) == 0, mc[0])):
            body = "*".join(m)
            if not m:
                parts.append(str(c))
            elif c == 1:
                parts.append(body)
            elif c == -1:
                parts.append("-" + body)
            else:
                parts.append(f"{c}*{body}")
        return " + ".join(parts).replace("+ -", "- ")

    __repr__ = __str__


def _terms(d: Dim) -> dict[tuple[str, ...], int]:
    return as_sym(d).terms if isinstance(d, Sym) else ({(): int(d)} if d else {})


def as_sym(d: Dim) -> Sym:
    return d if isinstance(d, Sym) else Sym({(): int(d)})


def _make(terms) -> Dim:
    terms = {m: c for m, c in terms.items() if c != 0}
    if not terms:
        return 0
    if set(terms) == {()}:
        return terms[()]
    return Sym(terms)


def opaque(name: str) -> Sym:
    """An atom for an expression we cannot reason about, named after it."""
    return Sym.var(name)


def div(a: Dim, b: Dim) -> Dim:
    """Exact division where the divisor divides every term; otherwise an opaque atom."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    if isinstance(b, int):
        if b != 0 and all(c % b == 0 for c in _terms(a).values()):
            return _make({m: c // b for m, c in _terms(a).items()})
        return opaque(f"({a})//{b}")
    # Polynomial divisor: try the quotient of leading terms, and keep it if it divides exactly
    # (64*batch*(past + seq) // (16*(past + seq)) = 4*batch).
    (bm, bc), at = max(_terms(b).items()), _terms(a)
    for am, ac in at.items():
        rest = list(am)
        if ac % bc or any(rest.count(x) < bm.count(x) for x in set(bm)):
            continue
        for x in bm:
            rest.remove(x)
        q = _make({tuple(rest): ac // bc})
        if as_sym(q) * b == a or q * b == a:
            return q
    return opaque(f"({a})//({b})")


# Upper bounds on named dims, or on sums of them (a tuple of names), that simplification may
# assume (see `assume_upper_bounds`).
_UPPER: dict[str | tuple[str, ...], int] = {}


@contextlib.contextmanager
def assume_upper_bounds(bounds: dict[str | tuple[str, ...], int]):
    """Within this block, max/min simplify using dim <= bound for the named dims, and sum <= bound
    for the sums named by tuples (all dims are >= 0). A compiler that specializes for a context
    length uses it (past + seq <= context); its runtime must then refuse longer contexts."""
    saved = dict(_UPPER)
    _UPPER.update(bounds)
    try:
        yield
    finally:
        _UPPER.clear()
        _UPPER.update(saved)


def upper_bound(d: Dim) -> int | None:
    """The largest value `d` can take under the assumed bounds, or None if unbounded."""
    terms, total = dict(_terms(d)), 0
    for group, limit in _UPPER.items():  # k * (a + b) <= k * limit, the rest term by term
        k = min(terms.get((name,), 0) for name in group) if isinstance(group, tuple) else 0
        if k > 0:
            for name in group:
                terms[(name,)] -= k
            total += k * limit
    for m, c in terms.items():
        if c < 0 and m:
            continue  # a monomial of dims is >= 0: a negative term of one only lowers the value
        p = c
        for a in m:
            if a not in _UPPER:
                return None
            p *= _UPPER[a]
        total += p
    return total


def _le(a: Dim, b: Dim) -> bool:
    """Provably a <= b (under the assumed bounds)."""
    bound = upper_bound(a - b) if _UPPER else None
    return bound is not None and bound <= 0


def dim_max(a: Dim, b: Dim) -> Dim:
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    if _le(a, b):
        return b
    if _le(b, a):
        return a
    # Dims are non-negative, so max(d, c) is d for c <= 0 when d is a sum of dims.
    for x, y in ((a, b), (b, a)):
        if isinstance(y, int) and y <= 0 and is_nonnegative(x):
            return x
    return opaque(f"max({a}, {b})")


def is_nonnegative(d: Dim) -> bool:
    """True when `d` is provably >= 0: a polynomial in dims with no negative coefficient."""
    return all(c >= 0 for c in _terms(d).values())


def dim_min(a: Dim, b: Dim) -> Dim:
    if a == b:
        return a
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    if _le(a, b):
        return a
    if _le(b, a):
        return b
    for x, y in ((a, b), (b, a)):
        if isinstance(y, int) and y >= 2**31 - 1:  # exporters use INT_MAX as "to the end"
            return x
    return opaque(f"min({a}, {b})")


def evaluate(d: Dim, env: dict[str, int]) -> int:
    return d if isinstance(d, int) else d.evaluate(env)


def is_static(d: Dim) -> bool:
    return isinstance(d, int)
