"""Plan dims: integers, or polynomials over named dims whose atoms are the run-time dims
(batch, seq, past, total; blocks, a paged KV cache's pool) or expressions over them.

A dim is encoded as [[coefficient, [atom, ...]], ...]. An atom that is not a named dim is an
expression the compiler could not reduce to a polynomial: `min(seq, 1)` (an export that keeps
the last position's logits), `max(past, 7)`, `(seq + 3)//4`. Expressions use integers, the named
dims, + - * // and min/max, and are parsed here (never evaluated by Python's eval), once each.
"""

from __future__ import annotations

import functools
import re

DIMS = ("batch", "seq", "past", "total", "blocks")  # blocks: a paged KV cache's pool
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|(//|[-+*(),]))")


class BadDim(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def parse(text: str):
    """An expression tree: int | str (a named dim) | (op, a, b) with op in + - * // min max."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise BadDim(f"dim expression {text!r}: unexpected {text[pos:]!r}")
            break
        tokens.append(int(m.group(1)) if m.group(1) else m.group(2) or m.group(3))
        pos = m.end()
    tree, rest = _sum(tokens, text)
    if rest:
        raise BadDim(f"dim expression {text!r}: unexpected {rest[0]!r}")
    return tree


def _expect(tokens, token, text):
    if not tokens or tokens[0] != token:
        raise BadDim(f"dim expression {text!r}: expected {token!r}")
    return tokens[1:]


def _chain(tokens, text, ops, operand):
    """operand (op operand)*, left-associative."""
    left, tokens = operand(tokens, text)
    while tokens and tokens[0] in ops:
        op = tokens[0]
        right, tokens = operand(tokens[1:], text)
        left = (op, left, right)
    return left, tokens


def _sum(tokens, text):
    return _chain(tokens, text, ("+", "-"), _product)


def _product(tokens, text):
    return _chain(tokens, text, ("*", "//"), _atom)


def _atom(tokens, text):
    if not tokens:
        raise BadDim(f"dim expression {text!r}: ends too early")
    head, tokens = tokens[0], tokens[1:]
    if head == "-":
        value, tokens = _atom(tokens, text)
        return ("-", 0, value), tokens
    if head == "(":
        value, tokens = _sum(tokens, text)
        return value, _expect(tokens, ")", text)
    if head in ("min", "max"):
        a, tokens = _sum(_expect(tokens, "(", text), text)
        b, tokens = _sum(_expect(tokens, ",", text), text)
        return (head, a, b), _expect(tokens, ")", text)
    if isinstance(head, int):
        return head, tokens
    if head in DIMS:
        return head, tokens
    raise BadDim(f"dim expression {text!r}: {head!r} is not a run-time dim ({', '.join(DIMS)})")


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "//": lambda a, b: a // b, "min": min, "max": max}


def _eval(tree, env):
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        return env[tree]
    op, a, b = tree
    return _OPS[op](_eval(a, env), _eval(b, env))


def atom(name: str, env: dict[str, int]) -> int:
    """The value of one atom: a named dim, or an expression over them."""
    value = env.get(name)
    return value if value is not None else _eval(parse(name), env)


def evaluate(dim, env: dict[str, int]) -> int:
    """A plan dim (an integer, or [[coefficient, [atom, ...]], ...]) at the dims in `env`."""
    if isinstance(dim, int):
        return dim
    total = 0
    for coeff, atoms in dim:
        term = coeff
        for a in atoms:
            term *= atom(a, env)
        total += term
    return total


def elements(shape: list) -> dict:
    """A shape's element count as a polynomial, canonical ({sorted atoms: coefficient}, no zero
    terms): two shapes hold as many elements at every run-time dim iff theirs are equal."""
    total = {(): 1}
    for dim in shape:
        terms = [(dim, [])] if isinstance(dim, int) else dim
        product = {}
        for m1, c1 in total.items():
            for c2, m2 in terms:
                m = tuple(sorted(m1 + tuple(m2)))
                product[m] = product.get(m, 0) + c1 * c2
        total = {m: c for m, c in product.items() if c}
    return total


def names(name: str) -> set[str]:
    """The named dims an atom depends on."""
    def walk(tree):
        if isinstance(tree, str):
            return {tree}
        return walk(tree[1]) | walk(tree[2]) if isinstance(tree, tuple) else set()
    return walk(parse(name))


def is_atom(name) -> bool:
    try:
        return isinstance(name, str) and bool(names(name))
    except BadDim:
        return False
