"""The no-quire look-up path (kernels.lut) against the float kernel it replaces, for posits
and 8-bit binary floats alike."""

import numpy as np
import pytest
import torch

from positnn import Float, Posit, quire
from positnn.kernels import accumulate as acc
from positnn.kernels import lut

FORMATS = [Posit(*f) for f in [(8, 0), (8, 1), (8, 2), (8, 3), (7, 1), (6, 0), (5, 2), (4, 1), (3, 0)]] + [
    Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 4), Float(2, 1), Float(4, 3, specials="fn", overflow="nan"),
    Float(5, 2, overflow="saturate"), Float(4, 2, subnormals=False),
]


def _float_kernel(a, b, bias, fmt, underflow):
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=fmt.dtype)
    bv = torch.empty(0, dtype=torch.float64) if bias is None else bias
    acc.sequential_dot(a.numpy(), b.numpy(), bv.numpy(), out.numpy(), fmt._accumulate_params(underflow))
    return out


def _draw(fmt, shape, g, zeros=0.3, nar=0.0):
    vals = fmt.values().to(fmt.dtype)
    finite = vals[torch.isfinite(vals)]
    x = finite[torch.randint(len(finite), shape, generator=g)]
    x = torch.where(torch.rand(shape, generator=g) < zeros, torch.zeros(()), x)
    return torch.where(torch.rand(shape, generator=g) < nar, torch.full((), float("nan")), x).to(fmt.dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("underflow", [False, True])
def test_lut_matches_float_kernel(fmt, underflow):
    g = torch.Generator().manual_seed(fmt.nbits * 10 + FORMATS.index(fmt) + 100 * underflow)
    for nb, M, K, N, nar in [(1, 7, 33, 5, 0.0), (2, 40, 100, 3, 0.0), (1, 65, 17, 9, 0.01), (3, 1, 200, 1, 0.0)]:
        a, b = _draw(fmt, (nb, M, K), g, nar=nar), _draw(fmt, (nb, K, N), g, nar=nar)
        bias = torch.randn(N, generator=g, dtype=torch.float64) * 4
        for bv in (None, bias):
            got = quire._lut_bmm(a, b, bv, fmt, underflow)
            exp = _float_kernel(a, b, bv, fmt, underflow)
            if got is None:  # only a bias rounding to -0 refuses the tables
                rb = fmt.round(bv, underflow=underflow) if bv is not None else torch.ones(1)
                assert bool(((rb == 0) & torch.signbit(rb)).any())
                continue
            assert torch.equal(torch.isnan(got), torch.isnan(exp))
            assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(exp)), (fmt, nb, M, K, N)
            live = ~torch.isnan(exp)  # the sign of a NaN means nothing
            assert torch.equal(torch.signbit(got)[live], torch.signbit(exp)[live])


def test_lut_tables_cover_every_pair():
    for fmt in [Posit(8, 2), Posit(6, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 2)]:
        vals, mul, add = quire._lut_tables(fmt, False)[:3]
        S = 1 << fmt.nbits
        a = torch.from_numpy(np.repeat(vals, S))
        b = torch.from_numpy(np.tile(vals, S))
        p = fmt.mul(a, b).double()
        s = fmt.add(a, b).double()
        assert torch.equal(torch.from_numpy(vals[mul.astype(np.int64)]).nan_to_num(), p.nan_to_num())
        assert torch.equal(torch.from_numpy(vals[add.astype(np.int64)]).nan_to_num(), s.nan_to_num())


def test_lut_falls_back_on_non_posits():
    fmt = Posit(8, 0)
    a = torch.tensor([[[0.3, 1.0]]], dtype=torch.float32)  # 0.3 is no posit(8,0)
    b = torch.tensor([[[1.0], [2.0]]], dtype=torch.float32)
    assert quire._lut_bmm(a, b, None, fmt, False) is None
    out = quire.matmul(a[0], b[0], fmt, mode="none")
    assert torch.equal(out, _float_kernel(a, b, None, fmt, False)[0])
    # A bias that rounds to -0 keeps its sign on the float path: no table then.
    assert quire._lut_bmm(b.transpose(1, 2), b, torch.tensor([-0.0], dtype=torch.float64), fmt, False) is None


@pytest.mark.parametrize("fmt", [Posit(8, 2), Posit(8, 0), Posit(6, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2")], ids=str)
def test_lut_conv_matches_float_kernel(fmt, monkeypatch):
    g = torch.Generator().manual_seed(fmt.nbits)
    for (N, c, h, w), (o, kh), stride, pad, dil, groups in [
        ((2, 3, 9, 8), (4, 3), 1, 1, 1, 1), ((3, 4, 11, 10), (6, 3), 2, 0, 1, 2), ((2, 2, 12, 12), (2, 2), (1, 2), 2, 2, 1),
    ]:
        x, k = _draw(fmt, (N, c, h, w), g), _draw(fmt, (o, c // groups, kh, kh), g)
        b = _draw(fmt, (o,), g, zeros=0.0)
        y = quire.conv2d(x, k, b, fmt, stride, pad, dil, groups, mode="none")
        d = _draw(fmt, tuple(y.shape), g)
        got = [y, quire.conv2d(x, k, None, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups, mode="none")]
        monkeypatch.setattr(quire, "_lut_patterns", lambda *a: None)  # the float kernel everywhere
        exp = [quire.conv2d(x, k, b, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d(x, k, None, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups, mode="none")]
        monkeypatch.undo()
        for gv, ev in zip(got, exp):
            assert gv.shape == ev.shape and torch.equal(gv.isnan(), ev.isnan()), (fmt, stride, pad, dil, groups)
            assert torch.equal(gv.nan_to_num(), ev.nan_to_num()), (fmt, stride, pad, dil, groups)  # fp8 sums overflow


def test_f32_patterns_agree_with_encode():
    """Patterns by look-up equal the format's own encode (-0 looked up as +0), and None
    exactly when an element is not a value of the format."""
    for fmt in [Posit(8, 0), Posit(8, 2), Posit(8, 4), Posit(5, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 1)]:
        vals = fmt.values().float()
        odd = torch.tensor([0.3, -0.0, float("inf"), -float("inf"), 1e-30, -1e-40, 3e38, float("nan")])
        for x in (vals, torch.cat([vals, odd[:2]]), odd[2:4], odd[4:5], odd[5:6], odd[6:7], odd[7:], vals.double()):
            p = quire._lut_patterns(x, fmt, False)
            try:
                q = quire._patterns_of(torch.where(x == 0, 0.0, x), fmt).to(torch.uint8)
            except ValueError:  # some element is no value of the format
                q = None
            assert (p is None) == (q is None), (fmt, x)
            if p is not None:
                assert torch.equal(p, q), (fmt, x)
