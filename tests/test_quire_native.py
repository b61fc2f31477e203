"""Sliced native convolutions (quire._native_plan / _native_op) against the unfolded GEMM
path, which the oracle suites check against Fraction and SoftPosit references."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positnn import Posit, quire

from posit_reference import decode_pattern, round_pattern


def _wide(shape, g, fmt, binades):
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-binades, binades + 1, shape, generator=g).double())
    x = torch.where(torch.rand(shape, generator=g) < 0.2, torch.zeros(()), x)
    return fmt.round(x)


@pytest.mark.parametrize("fmt", [Posit(16, 2), Posit(16, 1), Posit(8, 2), Posit(32, 2)])
@pytest.mark.parametrize("binades", [3, 12, 22])
def test_sliced_native_conv_matches_unfolded(fmt, binades, monkeypatch):
    g = torch.Generator().manual_seed(binades + fmt.nbits)
    for (n, c, h, w), (o, kh), stride, pad, dil, groups in [
        ((2, 3, 9, 8), (4, 3), 1, 1, 1, 1), ((3, 4, 11, 10), (6, 3), 2, 0, 1, 2), ((2, 2, 12, 12), (2, 2), 1, 2, 2, 1),
        ((3, 4, 5, 5), (6, 5), 1, 0, 1, 1), ((2, 3, 4, 4), (5, 4), 2, 0, 1, 1),  # whole-window: GEMMs
    ]:
        x = _wide((n, c, h, w), g, fmt, binades)
        k = _wide((o, c // groups, kh, kh), g, fmt, binades)
        b = _wide((o,), g, fmt, binades)
        y = quire.conv2d(x, k, b, fmt, stride, pad, dil, groups)
        d = _wide(tuple(y.shape), g, fmt, binades)
        got = [
            quire.conv2d(x, k, b, fmt, stride, pad, dil, groups),
            quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups),
            quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups),
        ]
        plans = [quire._native_plan(x, k, 1), quire._native_plan(d, k, 1), quire._native_plan(x, d, 1)]
        monkeypatch.setattr(quire, "_native_plan", lambda *a: None)
        exp = [
            quire.conv2d(x, k, b, fmt, stride, pad, dil, groups),
            quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups),
            quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups),
        ]
        monkeypatch.undo()
        for gv, ev, p in zip(got, exp, plans):
            assert torch.equal(gv, ev), (fmt, binades, p)


def test_sliced_plan_is_used_for_wide_operands():
    fmt = Posit(16, 2)
    x = torch.tensor([2.0**20, 2.0**-20]).reshape(1, 1, 1, 2)
    k = torch.tensor([2.0**10, 2.0**-16]).reshape(1, 1, 1, 2)
    plan = quire._native_plan(x, k, 2)
    assert plan is not None and plan[0] * plan[1] > 1
    y = quire.conv2d(x, k, None, fmt)
    assert y.item() == fmt.round(torch.tensor([2.0**30 + 2.0**-36], dtype=torch.float64)).item()


def test_round_stack_fast_and_limb_paths():
    from positnn.kernels import accumulate as acc

    def run(terms, bias=None):
        G = torch.tensor(terms, dtype=torch.float64).view(len(terms), 1, 1, 1)
        out = torch.empty((1, 1, 1), dtype=torch.float64)
        bv = torch.empty(0, dtype=torch.float64) if bias is None else torch.tensor([bias], dtype=torch.float64)
        acc.round_stack(G.numpy(), bv.numpy(), True, out.numpy(), 8, 0, False)
        return out.item()

    # posit(8,0) near 1: spacing 2**-5, midpoint 1 + 2**-6 (a tie, to even: 1).
    assert run([2.0**60, 1 + 2.0**-6, -(2.0**60)]) == 1.0  # TwoSum path
    assert run([2.0**60, 1 + 2.0**-6, 2.0**-60, -(2.0**60)]) == 1 + 2.0**-5  # limbs: the 2**-60 breaks the tie
    assert run([2.0**60, 1 + 2.0**-6, -(2.0**60)], bias=2.0**-60) == 1 + 2.0**-5
    assert run([2.0**60, 1 + 2.0**-6, -(2.0**60)], bias=-(2.0**-60)) == 1.0
    assert math.isnan(run([1.0, float("nan")]))


def _spanning(shape, g, fmt, top, span):
    """fmt values whose whole tensor spans about ``span`` bits below 2**top."""
    x = fmt.round(torch.rand(shape, generator=g, dtype=torch.float64) * 2.0**top)
    x.view(-1)[0] = fmt.round(torch.tensor(2.0 ** (top - 1)))
    x.view(-1)[1] = 2.0 ** (top - span)  # the lowest bit (a power of two, exact in fmt)
    return x


@pytest.mark.parametrize("spans,fmt,expect", [
    ((14, 9), Posit(8, 2), (torch.float32, True)),  # LeNet conv1's spans: two float32 slice pairs
    ((17, 12), Posit(8, 2), (torch.float32, True)),
    ((30, 20), Posit(16, 2), (torch.float32, False)),  # too wide to add the pairs in float64: limbs
    ((40, 40), Posit(16, 2), (torch.float64, False)),  # too many float32 pairs
])
def test_float32_plans_match_the_unfolded_gemm(spans, fmt, expect, monkeypatch):
    g = torch.Generator().manual_seed(sum(spans))
    x = _spanning((2, 3, 7, 7), g, fmt, 2, spans[0])
    k = _spanning((4, 3, 3, 3), g, fmt, -1, spans[1])
    plan = quire._native_plan(x, k, 27)
    assert (plan.dtype, plan.sum64) == expect, plan
    y = quire.conv2d(x, k, None, fmt, 1, 1)
    d = _spanning(tuple(y.shape), g, fmt, 0, spans[1])
    got = [y, quire.conv2d_weight_grad(x, d, k.shape, fmt, 1, 1)]
    monkeypatch.setattr(quire, "_native_plan", lambda *a: None)
    exp = [quire.conv2d(x, k, None, fmt, 1, 1), quire.conv2d_weight_grad(x, d, k.shape, fmt, 1, 1)]
    assert all(torch.equal(a, b) for a, b in zip(got, exp))


def test_float32_plans_need_ieee_float32(monkeypatch):
    fmt = Posit(8, 2)
    g = torch.Generator().manual_seed(0)
    x, k = _spanning((2, 3, 7, 7), g, fmt, 2, 14), _spanning((4, 3, 3, 3), g, fmt, -1, 9)
    assert quire._native_plan(x, k, 27).dtype == torch.float32
    monkeypatch.setattr(torch.backends.mkldnn.conv, "fp32_precision", "bf16")
    assert quire._native_plan(x, k, 27).dtype == torch.float64
    assert quire._native_plan(x, k, 27, 0).dtype == torch.float64  # no float32 advantage: never


def test_float32_plans_stay_in_float32s_normal_range(monkeypatch):
    # 4-bit operands, which float32 holds near 1, placed where an operand, a product or a
    # sum would leave float32's normal range: float64 plans there, and the same results
    fmt = Posit(32, 3)  # values from 2**-240 to 2**240
    for ta, tb, dtype in [(1, -2, torch.float32), (62, 61, torch.float32), (-100, -40, torch.float64),
                          (140, -120, torch.float64), (64, 64, torch.float64)]:
        g = torch.Generator().manual_seed(abs(ta))
        x = torch.randint(-15, 16, (1, 2, 4, 4), generator=g).double() * 2.0 ** (ta - 4)
        k = torch.randint(-15, 16, (2, 2, 2, 2), generator=g).double() * 2.0 ** (tb - 4)
        assert quire._native_plan(x, k, 8).dtype == dtype, (ta, tb)
        y = quire.conv2d(x, k, None, fmt)
        with monkeypatch.context() as m:
            m.setattr(quire, "_native_plan", lambda *a: None)
            assert torch.equal(y, quire.conv2d(x, k, None, fmt)), (ta, tb)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_hypothesis_round_stack_matches_fraction_reference(data):
    """round_stack (TwoSum pass and limb pass) rounds the exact sum of its terms once, as a
    Fraction sum rounded by the reference posit rounding."""
    from positnn.kernels import accumulate as acc

    n, es = data.draw(st.sampled_from([(8, 0), (8, 2), (16, 1), (16, 2), (32, 2)]), label="fmt")
    T = data.draw(st.integers(1, 4), label="T")  # 4: also hidden ties
    M, N = data.draw(st.integers(1, 3), label="M"), data.draw(st.integers(1, 9), label="N")
    # Some elements are a tie between neighbours hidden under +-2**k that cancels, with a
    # tiny term that breaks it: TwoSum cannot add those errors exactly, the limb pass does.
    midpoint = st.integers(1, 2 ** (n - 1) - 2).map(lambda p: float(decode_pattern(2 * p + 1, n + 1, es)))
    term = st.builds(lambda m, e: m * 2.0**e, st.integers(-(2**20), 2**20), st.integers(-90, 70))
    hidden_tie = st.builds(lambda k, mid, tiny: [2.0**k, mid, tiny, -(2.0**k)], st.integers(55, 70), midpoint,
                           st.sampled_from([2.0**-60, -(2.0**-60), 0.0])).flatmap(st.permutations)
    plain = st.lists(term, min_size=T, max_size=T)
    element = st.one_of(hidden_tie, plain) if T == 4 else plain
    cells = data.draw(st.lists(element, min_size=M * N, max_size=M * N), label="terms")
    G = torch.tensor(cells, dtype=torch.float64).t().reshape(T, 1, M, N)
    on_rows = data.draw(st.booleans(), label="bias on rows")
    bias = data.draw(st.none() | st.lists(term, min_size=M if on_rows else N, max_size=M if on_rows else N), label="bias")
    bv = torch.tensor(bias or [], dtype=torch.float64)
    out = torch.empty((1, M, N), dtype=torch.float64)
    acc.round_stack(G.numpy(), bv.numpy(), on_rows, out.numpy(), n, es, False)
    for i in range(M):
        for j in range(N):
            exact = sum(Fraction(float(G[t, 0, i, j])) for t in range(T))
            if bias is not None:
                exact += Fraction(bias[i] if on_rows else bias[j])
            want = decode_pattern(round_pattern(exact, n, es), n, es)
            assert Fraction(float(out[0, i, j])) == want, (n, es, i, j)
