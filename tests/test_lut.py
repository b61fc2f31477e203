"""The no-quire look-up path (positnn.lookup, kernels.lut) against the float kernel it
replaces, for posits and binary floats of up to 12 bits alike, and the scattering
convolutions (positnn.scatter) against the float kernel on unfolded operands."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positnn import Float, Posit, lookup, quire, scatter
from positnn.kernels import accumulate as acc

FORMATS = [Posit(*f) for f in [(8, 0), (8, 1), (8, 2), (8, 3), (7, 1), (6, 0), (5, 2), (4, 1), (3, 0)]] + [
    Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 4), Float(2, 1), Float(4, 3, specials="fn", overflow="nan"),
    Float(5, 2, overflow="saturate"), Float(4, 2, subnormals=False),
]
# Above 8 bits the patterns and tables are uint16 and the keys read more float32 bits.
WIDE = [Posit(9, 0), Posit(10, 1), Posit(12, 0), Posit(12, 2), Posit(11, 3), Float(5, 6), Float(4, 5, subnormals=False)]


def _float_kernel(a, b, bias, fmt, underflow):
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=fmt.dtype)
    bv = torch.empty(0, dtype=torch.float64) if bias is None else bias
    acc.sequential_dot(a.numpy(), b.numpy(), bv.numpy(), out.numpy(), fmt._accumulate_params(underflow))
    return out


def _unfold_on_float_kernel(mp: pytest.MonkeyPatch) -> None:
    """Send every no-quire convolution through the float kernel on unfolded operands."""
    mp.setattr(lookup, "patterns", lambda *a: None)
    mp.setattr(scatter, "_scatter", lambda *a, **k: None)


def _draw(fmt, shape, g, zeros=0.3, nar=0.0):
    if fmt.nbits <= 16:
        vals = fmt.values().to(fmt.dtype)
        finite = vals[torch.isfinite(vals)]
    else:  # too many values to list: rounded normals of several binades
        scale = 2.0 ** torch.randint(-8, 8, (4096,), generator=g)
        finite = fmt.round(torch.randn(4096, generator=g, dtype=torch.float64) * scale)
    x = finite[torch.randint(len(finite), shape, generator=g)]
    x = torch.where(torch.rand(shape, generator=g) < zeros, torch.zeros(()), x)
    return torch.where(torch.rand(shape, generator=g) < nar, torch.full((), float("nan")), x).to(fmt.dtype)


@pytest.mark.parametrize("fmt", FORMATS + WIDE, ids=str)
@pytest.mark.parametrize("underflow", [False, True])
def test_lut_matches_float_kernel(fmt, underflow):
    g = torch.Generator().manual_seed(fmt.nbits * 10 + (FORMATS + WIDE).index(fmt) + 100 * underflow)
    for nb, M, K, N, nar in [(1, 7, 33, 5, 0.0), (2, 40, 100, 3, 0.0), (1, 65, 17, 9, 0.01), (3, 1, 200, 1, 0.0)]:
        a, b = _draw(fmt, (nb, M, K), g, nar=nar), _draw(fmt, (nb, K, N), g, nar=nar)
        bias = torch.randn(N, generator=g, dtype=torch.float64) * 4
        for bv in (None, bias):
            got = lookup.bmm(a, b, bv, fmt, underflow)
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
    for fmt in [Posit(8, 2), Posit(6, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 2), Posit(10, 1), Float(4, 5)]:
        vals, mul, add = lookup.tables(fmt, False)[:3]
        S = 1 << fmt.nbits
        a = torch.from_numpy(np.repeat(vals, S))
        b = torch.from_numpy(np.tile(vals, S))
        p = fmt.mul(a, b).double()
        s = fmt.add(a, b).double()
        assert torch.equal(torch.from_numpy(vals[mul.astype(np.int64)]).nan_to_num(), p.nan_to_num())
        assert torch.equal(torch.from_numpy(vals[add.astype(np.int64)]).nan_to_num(), s.nan_to_num())


@pytest.mark.parametrize("fmt", [Posit(16, 1), Posit(13, 0), Posit(16, 2), Posit(8, 2), Float.parse("bf16"),
                                 Float.parse("fp16"), Float.parse("fp8e4m3")], ids=str)
def test_row_blocked_float_kernel_matches_column_kernel(fmt):
    """The two loop orders of the no-quire float kernel give the same bits: zeros skipped or
    not as rows of B hold NaR, a bias that rounds to -0, a partial block of rows."""
    g = torch.Generator().manual_seed(fmt.nbits + 7)
    for nb, M, K, N, nar in [(1, 37, 25, 6, 0.0), (2, 16, 9, 1, 0.02), (1, 50, 40, 7, 0.01), (1, 17, 3, 2, 0.0)]:
        a, b = _draw(fmt, (nb, M, K), g, zeros=0.4, nar=nar), _draw(fmt, (nb, K, N), g, nar=nar)
        bias = (torch.randn(N, generator=g, dtype=torch.float64) * 4).to(fmt.dtype).double()
        bias[0] = -1e-300  # rounds to -0 in floats that flush, to -minpos in posits
        for bv in (torch.empty(0, dtype=torch.float64), bias):
            cols = torch.empty((nb, M, N), dtype=fmt.dtype)
            rows = torch.empty((nb, M, N), dtype=fmt.dtype)
            args = (a.numpy(), b.numpy(), bv.numpy())
            acc._sequential_dot(*args, cols.numpy(), fmt._accumulate_params(False))
            acc._sequential_dot_rows(*args, rows.numpy(), fmt._accumulate_params(False))
            assert torch.equal(cols.isnan(), rows.isnan())
            live = ~cols.isnan()
            assert torch.equal(cols[live], rows[live]), (fmt, nb, M, K, N)
            assert torch.equal(torch.signbit(cols[live]), torch.signbit(rows[live])), (fmt, nb, M, K, N)


def test_lut_tables_of_12_bits_sampled():
    """Two tables of 16M entries each: a random sample of pairs, against the float kernels."""
    fmt = Posit(12, 1)
    vals, mul, add = lookup.tables(fmt, False)[:3]
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(1 << 24, (200_000,), generator=g)
    a, b = torch.from_numpy(vals)[idx >> 12], torch.from_numpy(vals)[idx & 4095]
    got_mul, got_add = torch.from_numpy(vals[mul[idx.numpy()].astype(np.int64)]), torch.from_numpy(vals[add[idx.numpy()].astype(np.int64)])
    assert torch.equal(got_mul.nan_to_num(), fmt.mul(a, b).double().nan_to_num())
    assert torch.equal(got_add.nan_to_num(), fmt.add(a, b).double().nan_to_num())


def test_lut_only_for_narrow_float32_formats():
    """No tables above 12 bits, nor for formats with values beyond float32 (posit(8,5))."""
    assert [lookup.supports(f) for f in (Posit(12, 2), Posit(13, 1), Posit(16, 1), Posit(8, 5), Posit(12, 4))] == [
        True, False, False, False, False]
    g = torch.Generator().manual_seed(5)
    for fmt in (Posit(8, 5), Posit(16, 1)):
        a, b = _draw(fmt, (1, 4, 6), g), _draw(fmt, (1, 6, 3), g)
        assert lookup.bmm(a, b, None, fmt, False) is None
        assert torch.equal(quire.matmul(a[0], b[0], fmt, mode="none"), _float_kernel(a, b, None, fmt, False)[0])


def test_lut_falls_back_on_non_posits():
    fmt = Posit(8, 0)
    a = torch.tensor([[[0.3, 1.0]]], dtype=torch.float32)  # 0.3 is no posit(8,0)
    b = torch.tensor([[[1.0], [2.0]]], dtype=torch.float32)
    assert lookup.bmm(a, b, None, fmt, False) is None
    out = quire.matmul(a[0], b[0], fmt, mode="none")
    assert torch.equal(out, _float_kernel(a, b, None, fmt, False)[0])
    # A bias that rounds to -0 keeps its sign on the float path: no table then.
    assert lookup.bmm(b.transpose(1, 2), b, torch.tensor([-0.0], dtype=torch.float64), fmt, False) is None


@pytest.mark.parametrize("fmt", [Posit(8, 2), Posit(8, 0), Posit(6, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2"),
                                 Posit(10, 1), Posit(12, 2)], ids=str)
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
        _unfold_on_float_kernel(monkeypatch)
        exp = [quire.conv2d(x, k, b, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d(x, k, None, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups, mode="none"),
               quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups, mode="none")]
        monkeypatch.undo()
        for gv, ev in zip(got, exp):
            assert gv.shape == ev.shape and torch.equal(gv.isnan(), ev.isnan()), (fmt, stride, pad, dil, groups)
            assert torch.equal(gv.nan_to_num(), ev.nan_to_num()), (fmt, stride, pad, dil, groups)  # fp8 sums overflow


def _conv_ops(x, k, b, d, fmt, stride, pad, dil, groups):
    return [quire.conv2d(x, k, b, fmt, stride, pad, dil, groups, mode="none"),
            quire.conv2d_input_grad(d, k, x.shape, fmt, stride, pad, dil, groups, mode="none"),
            quire.conv2d_weight_grad(x, d, k.shape, fmt, stride, pad, dil, groups, mode="none")]


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from([Posit(8, 2), Posit(6, 1), Float.parse("fp8e4m3"), Posit(10, 1), Posit(16, 1),
                            Float.parse("bf16"), Posit(32, 2)]),
       geometry=st.tuples(*[st.integers(1, 3)] * 6 + [st.integers(0, 2)] * 2),
       kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)), groups=st.sampled_from([1, 2]),
       zeros=st.sampled_from([0.0, 0.5, 0.9]), nar=st.sampled_from([0.0, 0.02]), seed=st.integers(0, 2**31))
def test_hypothesis_scattered_conv_matches_float_kernel(fmt, geometry, kernel, groups, zeros, nar, seed):
    """The scattering convolutions (forward and input error; by look-up tables up to 12
    bits, by the float kernel above) and the unfolded weight gradient against the float
    kernel of the unfolded GEMM, over strides, dilations, paddings (also wider than the
    kernel), groups and kernel sizes: their per-element order of accumulation is the same.
    NaR in the kernel takes the unfolding fallback."""
    sh, sw, dh, dw, c, o, ph, pw = geometry
    c, o = c * groups, o * groups
    kh, kw = kernel
    g = torch.Generator().manual_seed(seed)
    h, w = (dil * (size - 1) + 1 + int(torch.randint(0, 6, (1,), generator=g)) for dil, size in [(dh, kh), (dw, kw)])
    x = _draw(fmt, (2, c, h, w), g, zeros=zeros, nar=nar)
    k = _draw(fmt, (o, c // groups, kh, kw), g, nar=nar)
    b = _draw(fmt, (o,), g, zeros=0.0)
    stride, pad, dil = (sh, sw), (ph, pw), (dh, dw)
    y = quire.conv2d(x, k, b, fmt, stride, pad, dil, groups, mode="none")
    d = _draw(fmt, tuple(y.shape), g, zeros=zeros, nar=nar)
    got = _conv_ops(x, k, b, d, fmt, stride, pad, dil, groups)
    with pytest.MonkeyPatch.context() as mp:
        _unfold_on_float_kernel(mp)
        exp = _conv_ops(x, k, b, d, fmt, stride, pad, dil, groups)
    for gv, ev in zip(got, exp):
        assert gv.shape == ev.shape and torch.equal(gv.isnan(), ev.isnan())
        assert torch.equal(gv.nan_to_num(), ev.nan_to_num())


def test_scatter_refuses_kernels_with_nonfinite_values():
    """A NaR weight times a skipped zero is NaR: the scatter must decline such kernels, and
    the convolution then still propagates NaR from the padding's zeros, as unfolding does."""
    x, k = torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)
    k[0, 0, 0, 0] = float("nan")
    for fmt in [Posit(8, 2), Posit(16, 2)]:
        assert scatter.conv2d(x, k, None, fmt, (1, 1), (1, 1), (1, 1), 1, False) is None
        assert scatter.conv2d_input_grad(x, k, x.shape, fmt, (1, 1), (1, 1), (1, 1), 1, False) is None
        y = quire.conv2d(x, k, None, fmt, 1, 1, mode="none")
        assert bool(y.isnan().all())  # every output reads tap (0, 0), inside x or in the padding


def test_f32_patterns_agree_with_encode():
    """Patterns by look-up equal the format's own encode (-0 looked up as +0), and None
    exactly when an element is not a value of the format."""
    for fmt in [Posit(8, 0), Posit(8, 2), Posit(8, 4), Posit(5, 1), Float.parse("fp8e4m3"), Float.parse("fp8e5m2"), Float(3, 1),
                Posit(9, 0), Posit(12, 0), Posit(12, 3), Float(5, 6)]:
        vals = fmt.values().float()
        odd = torch.tensor([0.3, -0.0, float("inf"), -float("inf"), 1e-30, -1e-40, 3e38, float("nan")])
        for x in (vals, torch.cat([vals, odd[:2]]), odd[2:4], odd[4:5], odd[5:6], odd[6:7], odd[7:], vals.double()):
            p = lookup.patterns(x, fmt, False)
            try:
                q = lookup.patterns_of(torch.where(x == 0, 0.0, x), fmt)
            except ValueError:  # some element is no value of the format
                q = None
            assert (p is None) == (q is None), (fmt, x)
            if p is not None:
                assert p.dtype == (torch.uint8 if fmt.nbits <= 8 else torch.uint16)
                assert torch.equal(p.to(torch.int64), q), (fmt, x)
