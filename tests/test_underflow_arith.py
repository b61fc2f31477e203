"""PositNN's underflow option in arithmetic results (every rounding flushes |x| <= minpos /
useed to 0, arithmetic included): exhaustive against the Fraction reference for small
formats, and through the stages, the G division and the optimizer."""
from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import positnn.functional as PF
from positnn import Posit
from positnn.optim import SGD
from positnn.policy import LayerPolicy
from positnn.stage import Stage
from posit_reference import Table, decode_pattern
from test_functional import from_positnn_loss

F64 = torch.float64
FORMATS = [(5, 2), (6, 1), (8, 2), (7, 0)]


def _values(n, es):
    return [v for v in (decode_pattern(p, n, es) for p in range(1 << n)) if v is not None]


def _expect(vals, n, es):
    t = Table(n, es)
    return torch.tensor([float(t.value(t.round_fraction(v, underflow=True))) for v in vals], dtype=F64)


@pytest.mark.parametrize("n,es", FORMATS, ids=[f"p{n}e{es}" for n, es in FORMATS])
def test_arithmetic_flushes_like_round(n, es):
    fmt = Posit(n, es)
    vals = _values(n, es)
    v = torch.tensor([float(x) for x in vals], dtype=F64)
    a, b = (t.reshape(-1) for t in torch.meshgrid(v, v, indexing="ij"))
    fa, fb = [x for x in vals for _ in vals], [y for _ in vals for y in vals]
    for op, exact in (("add", [x + y for x, y in zip(fa, fb)]), ("mul", [x * y for x, y in zip(fa, fb)])):
        got = getattr(fmt, op)(a, b, underflow=True).double()
        assert torch.equal(got, _expect(exact, n, es)), op
    nz = b != 0
    got = fmt.div(a[nz], b[nz], underflow=True).double()
    assert torch.equal(got, _expect([x / y for x, y in zip(fa, fb) if y != 0], n, es))
    # c = -a*b + tiny: fma's single rounding meets the flush threshold from both sides.
    c = fmt.round(-(a * b) * 1.0001)
    fc = [Fraction(x) for x in c.double().tolist()]
    got = fmt.fma(a, b, c, underflow=True).double()
    assert torch.equal(got, _expect([x * y + z for x, y, z in zip(fa, fb, fc)], n, es))
    # Without the flag nothing becomes 0 that was not exactly 0.
    assert (fmt.mul(a, b).double() != 0).sum() == ((a != 0) & (b != 0)).sum()


def test_the_threshold_itself_goes_to_zero_and_just_above_to_minpos():
    p5 = Posit(5, 2)  # minpos 2^-12, minpos / useed 2^-16
    got = p5.mul(torch.tensor([2.0**-12, 2.0**-12, 2.0**-12]), torch.tensor([2.0**-4, 2.0**-3, 2.0**-5]), underflow=True)
    assert got.tolist() == [0.0, 2.0**-12, 0.0]


def test_stages_and_the_gradient_division_flush():
    """In posit(5,2) a G quire result of minpos divided by the batch (64) is 2^-18: PositNN
    flushes it to 0 under its underflow option, and so does positnn now (minpos without)."""
    p5, p12 = Posit(5, 2), Posit(12, 2)
    for underflow, expected in ((True, 0.0), (False, 2.0**-12)):
        lp = LayerPolicy(forward=p5, backward=p5, gradient=p5, optimizer=p12, loss=p12, underflow=underflow,
                         grad_reduction="positnn")
        G = Stage.of(lp, "gradient")
        assert G.div(torch.tensor([2.0**-12]), 64.0).item() == expected
        x = torch.zeros(64, 1, dtype=F64)
        x[0, 0] = 2.0**-6
        w = torch.nn.Parameter(torch.tensor([[1.0]]))
        y = PF.linear(x, w, None, lp)
        g = torch.zeros_like(y)
        g[0, 0] = 2.0**-6  # the weight gradient's quire sum is 2^-12 = minpos, / 64 in G
        from_loss = from_positnn_loss(y, 64)
        from_loss.backward(g)
        assert w.grad.item() == expected, underflow


def test_optimizer_momentum_flushes_under_underflow():
    """v = m v + g in O: with m = 2^-10, v = 2^-20 and g = 0 the exact 2^-30 is below
    posit(8,2)'s minpos / useed (2^-28): minpos without the flag (a posit never rounds to
    0), 0 with it, as PositNN's fma results under its underflow option."""
    p8 = Posit(8, 2)
    for underflow in (True, False):
        lp = LayerPolicy(optimizer=p8, underflow=underflow)
        w = torch.nn.Parameter(torch.tensor([1.0]))
        w.posit_policy = lp
        opt = SGD([w], lr=2.0**-10, momentum=2.0**-10)
        for g in (2.0**-20, 0.0):
            w.grad = torch.tensor([g])
            opt.step()
        buf = opt.state[w]["momentum_buffer"].item()
        assert buf == (0.0 if underflow else p8.minpos), (underflow, buf)


def test_a_backend_without_the_flag_keeps_its_signature(monkeypatch):
    """A backend that does not declare ARITH_UNDERFLOW (Triton's) is called as before, and
    an op with the flag set runs in numba's kernels instead (host memory)."""
    from positnn import backends

    class NoFlag:
        NAME = "noflag"

        def add(self, a, b, fmt, device):
            return torch.full(a.shape, 7.0, dtype=fmt.dtype)

    monkeypatch.setattr(backends, "_backends", dict(backends._backends, noflag=NoFlag()))
    monkeypatch.setattr(backends, "_by_device", dict(backends._by_device, cpu="noflag"))
    p5 = Posit(5, 2)
    x = torch.tensor([2.0**-12])
    assert p5.add(x, x).item() == 7.0
    assert p5.add(x, -x * 0.9375, underflow=True).item() == 0.0  # 2^-16: the threshold, flushed
