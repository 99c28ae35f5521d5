"""Symbolic dims: canonical forms, exact division, what can and cannot be simplified."""

from __future__ import annotations

from llmc.ir.symbolic import Sym, dim_max, dim_min, div, is_nonnegative

batch, seq, past = Sym.var("batch"), Sym.var("seq"), Sym.var("past")


def test_canonical_sums_and_products():
    assert seq + past == past + seq
    assert hash(seq + past) == hash(past + seq)
    assert batch * seq == seq * batch
    assert (seq + past) - past == seq
    assert (seq + 3) - seq == 3 and isinstance((seq + 3) - seq, int)
    assert str(2 * batch * seq + past - 1) == "2*batch*seq + past - 1"


def test_exact_division():
    assert div(batch * seq * 64, 64) == batch * seq
    assert div(batch * seq * 64, seq) == batch * 64
    assert div(batch * seq * 64, batch * seq) == 64
    assert div(12, 4) == 3


def test_inexact_division_is_opaque():
    d = div(seq * 3, 2)
    assert isinstance(d, Sym) and d.atoms == {"(3*seq)//2"}
    assert div(seq * 3, 2) == d  # the same expression gives the same atom


def test_max_min_only_simplify_when_provable():
    assert dim_max(seq + past, 0) == seq + past
    assert dim_max(seq, 1) != seq  # seq may be 0
    assert dim_max(past - 4095, 0) != past - 4095  # past - 4095 may be negative
    assert dim_min(seq, 2**31 - 1) == seq
    assert dim_max(3, 5) == 5 and dim_min(3, 5) == 3
    assert is_nonnegative(batch * seq + 2) and not is_nonnegative(seq - 1)


def test_evaluate():
    assert (2 * batch * seq + past).evaluate({"batch": 2, "seq": 7, "past": 5}) == 33
