"""positnn.fam (PositNN's fused add-multiply) against the Fraction model of Universal's
``fam_corrected`` in posit_reference.py: exhaustive over operand pairs of small formats,
hypothesis for wide ones."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positnn import Posit
from posit_reference import decode_pattern, fam_universal, round_exact

F64 = torch.float64
PAIR_FORMATS = [(8, 2), (8, 0), (7, 1), (6, 2), (5, 2)]


def _values(n, es):
    vals = [decode_pattern(p, n, es) for p in range(1 << n)]
    return [v for v in vals if v is not None]


def _check(fmt, a, b, c):
    got = fmt.fam(a, b, c)
    exp = [fam_universal(Fraction(x), Fraction(y), Fraction(z), fmt.nbits, fmt.es)
           for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    bad = [(x, y, z, g, float(e)) for x, y, z, g, e in zip(a.tolist(), b.tolist(), c.tolist(), got.tolist(), exp)
           if g != float(e)]
    assert not bad, f"{len(bad)} mismatches in {fmt}, e.g. (a, b, c, got, expected) = {bad[:3]}"
    assert got.dtype == fmt.dtype


@pytest.mark.parametrize("n,es", PAIR_FORMATS, ids=[f"p{n}e{es}" for n, es in PAIR_FORMATS])
def test_fam_every_pair(n, es):
    """Every (a, b) pair, zeros included, with c = round(1/b) (the loss's use) and with a
    random posit c."""
    fmt = Posit(n, es)
    v = torch.tensor([float(x) for x in _values(n, es)], dtype=F64)
    a, b = (t.reshape(-1) for t in torch.meshgrid(v, v, indexing="ij"))
    recip = torch.where(b == 0, 0.0, fmt.div(1.0, torch.where(b == 0, 1.0, b)).double())
    _check(fmt, a, b, recip)
    _check(fmt, a, b, v[torch.randint(0, len(v), a.shape)])


@pytest.mark.parametrize("n,es", [(12, 2), (16, 2), (16, 1), (32, 2), (24, 0)])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fam_wide_formats(n, es, data):
    """Random operands, and the loss's case: a in (0, 1], b = -s with s >= 1, c = round(1/s)."""
    fmt = Posit(n, es)
    x = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)
    a, b, c = (fmt.round(torch.tensor(data.draw(st.lists(x, min_size=8, max_size=8)), dtype=F64)).double()
               for _ in range(3))
    _check(fmt, a, b, c)
    e = fmt.round(torch.tensor(data.draw(st.lists(st.floats(1e-9, 1.0), min_size=8, max_size=8)), dtype=F64))
    s = fmt.round(torch.tensor(data.draw(st.lists(st.floats(1.0, 64.0), min_size=8, max_size=8)), dtype=F64))
    s = torch.maximum(s, e)
    _check(fmt, e.double(), -s.double(), fmt.div(1.0, s).double())


def test_fam_is_the_exact_product_when_the_sum_is_exact():
    """With the sum exact on the adder's grid (a = 1 beside any s >= 1), fam is (a + b) * c
    rounded once, which round(a / b) - 1 is not: posit(8,2), s = 1.125."""
    p8 = Posit(8, 2)
    s = torch.tensor([1.125, 1.5, 3.0], dtype=F64)
    den = p8.div(1.0, s).double()
    got = p8.fam(torch.ones(3, dtype=F64), -s, den)
    exact = [round_exact((1 - Fraction(x)) * Fraction(d), 8, 2) for x, d in zip(s.tolist(), den.tolist())]
    assert got.tolist() == [float(v) for v in exact]
    assert got[0].item() == -0.109375 and p8.sub(p8.div(1.0, s[0]), 1.0).item() == -0.125


def test_fam_special_values():
    p8 = Posit(8, 2)
    nan = float("nan")
    a = torch.tensor([nan, 1.0, 1.0, 0.0, 2.0, 0.0], dtype=F64)
    b = torch.tensor([1.0, nan, 1.0, 0.0, -2.0, -1.0], dtype=F64)
    c = torch.tensor([1.0, 1.0, nan, 3.0, 5.0, 0.0], dtype=F64)
    got = p8.fam(a, b, c)
    assert got[:3].isnan().all()
    assert got[3:].tolist() == [0.0, 0.0, 0.0]
    # Broadcasting and Python scalars, as the other element-wise ops.
    assert p8.fam(torch.tensor([1.0, 2.0]), -1.0, 0.5).tolist() == [0.0, 0.5]
