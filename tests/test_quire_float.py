"""The quire for binary float formats (fp8, fp16, bf16, eXmY) against the exact Fraction
reference: every sum computed in Fractions and rounded once by ``float_reference``."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import float_reference as ref
from positnn import Float, quire

E4M3, E5M2 = Float.parse("fp8e4m3"), Float.parse("fp8e5m2")
FP16, BF16 = Float.parse("fp16"), Float.parse("bf16")
FORMATS = [E4M3, E5M2, FP16, BF16, Float(3, 2), Float(4, 3, specials="fn", overflow="nan"),
           Float(5, 2, overflow="saturate"), Float(6, 4, subnormals=False)]


def spec(f: Float) -> ref.Spec:
    return ref.Spec(f.exp_bits, f.man_bits, f.subnormals, f.specials == "fn", f.overflow)


def finite_values(fmt: Float) -> torch.Tensor:
    """Every finite value of a format of at most 16 bits (both zeros), as float64."""
    v = fmt.values().double()
    return v[torch.isfinite(v)]


def draw(fmt: Float, shape, g: torch.Generator, zeros: float = 0.2) -> torch.Tensor:
    """Random values of ``fmt``: uniform over its finite patterns (16-bit formats: over
    the values of float(e, 3) scaled into a band of binades, so that sums cancel)."""
    vals = finite_values(fmt if fmt.nbits <= 16 else Float(fmt.exp_bits, 3))
    x = vals[torch.randint(len(vals), shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < zeros, torch.zeros(()), x)


def ref_sum(terms, fmt: Float, bias=None) -> float:
    """round(sum of exact products (+ bias)) by the Fraction reference."""
    s = sum((Fraction(a) * Fraction(b) for a, b in terms), Fraction(0))
    if bias is not None:
        s += Fraction(bias)
    return ref.round_exact(s, spec(fmt))


def ref_matmul(a: torch.Tensor, b: torch.Tensor, fmt: Float, bias=None) -> torch.Tensor:
    A, B = a.double().tolist(), b.double().tolist()
    rows = [[ref_sum(zip(A[i], [B[k][j] for k in range(len(B))]), fmt, None if bias is None else float(bias[j]))
             for j in range(len(B[0]))] for i in range(len(A))]
    return torch.tensor(rows, dtype=torch.float64)


def assert_values(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal values (zeros of either sign equal: the reference's exact zeros are +0)."""
    got, expected = got.double(), expected.double()
    ok = (got == expected) | (got.isnan() & expected.isnan())
    if not bool(ok.all()):
        k = int((~ok).reshape(-1).nonzero()[0])
        pytest.fail(f"{what}: {int((~ok).sum())} of {ok.numel()} wrong, e.g. got {got.reshape(-1)[k].item()!r}, "
                    f"expected {expected.reshape(-1)[k].item()!r}")


@pytest.mark.parametrize("fmt", [E4M3, E5M2, Float(3, 2), Float(4, 3, specials="fn", overflow="nan")], ids=str)
def test_every_product_of_two_fp8_values(fmt):
    """Length-1 dot products over all pairs of finite values: round(a * b) exactly."""
    v = finite_values(fmt)
    got = quire.matmul(v[:, None], v[None, :], fmt)
    s = spec(fmt)
    exp = torch.tensor([[ref.round_exact(Fraction(x) * Fraction(y), s) for y in v.tolist()] for x in v.tolist()])
    assert_values(got, exp, f"{fmt} products")
    assert_values(quire.matmul(v[:, None], v[None, :], fmt, mode="none"), exp, f"{fmt} products, mode none")


@pytest.mark.parametrize("fmt", [pytest.param(E4M3, marks=pytest.mark.slow), pytest.param(E5M2, marks=pytest.mark.slow),
                                 Float(3, 2)], ids=str)
def test_every_sum_of_two_fp8_values_and_dots_of_length_two(fmt):
    """All pairs (x, y): x + y as a quire sum, and x * c + y * d for a few (c, d),
    including ones that make the two products cancel."""
    v = finite_values(fmt)
    x, y = v.repeat_interleave(len(v)), v.repeat(len(v))
    s = spec(fmt)
    pairs = list(zip(x.tolist(), y.tolist()))
    exp = torch.tensor([ref.round_exact(Fraction(p) + Fraction(q), s) for p, q in pairs])
    assert_values(quire.sum(torch.stack([x, y], -1), -1, fmt), exp, f"{fmt} sums")
    for c, d in [(1.0, -1.0), (0.5, 0.75), (-fmt.max, fmt.minpos), (fmt.minpos, fmt.minpos)]:
        got = quire.matmul(torch.stack([x, y], -1), torch.tensor([[c], [d]], dtype=torch.float64), fmt).squeeze(-1)
        exp = torch.tensor([ref.round_exact(Fraction(p) * Fraction(c) + Fraction(q) * Fraction(d), s) for p, q in pairs])
        assert_values(got, exp, f"{fmt} dots with ({c}, {d})")


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 6), st.integers(1, 300), st.integers(1, 5), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_matmul_with_bias_vs_fraction_reference(fmt, M, K, N, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = draw(fmt, (M, K), g), draw(fmt, (K, N), g)
    bias = draw(fmt, (N,), g) if with_bias else None
    assert_values(quire.matmul(a, b, fmt, bias=bias), ref_matmul(a, b, fmt, bias), f"{fmt} matmul")


@pytest.mark.parametrize("fmt", [FP16, BF16, Float(8, 23)], ids=str)
def test_wide_ranges_and_cancellation(fmt):
    """Operands spanning the format's whole range (the slicing path, several slice pairs),
    with cancelling pairs so that the small products decide the result."""
    g = torch.Generator().manual_seed(7)
    v = finite_values(fmt) if fmt.nbits <= 16 else None
    if v is None:
        exps = torch.randint(-140, 120, (8, 64), generator=g).double()
        a = torch.ldexp(torch.rand((8, 64), generator=g, dtype=torch.float64) + 1, exps.long())
        a = fmt.round(a).double()
    else:
        a = v[torch.randint(len(v), (8, 64), generator=g)]
    b = a.flip(0).t().contiguous()
    a = torch.cat([a, -a[:, :1], a[:, :1]], 1)  # big term and its negative
    b = torch.cat([b, b[:1], b[:1]], 0)
    assert_values(quire.matmul(a, b, fmt), ref_matmul(a, b, fmt), f"{fmt} wide")


@pytest.mark.parametrize("fmt", [E4M3, E5M2, FP16, Float(5, 2, overflow="saturate")], ids=str)
def test_overflow_follows_the_preset(fmt):
    """A sum beyond max: E4M3 and saturating formats give +-max, IEEE ones +-inf; a sum
    that overflows halfway and comes back is exact."""
    big = torch.full((1, 4), fmt.max, dtype=torch.float64)
    ones = torch.ones(4, 1, dtype=torch.float64)
    over = quire.matmul(big, ones, fmt).item()
    assert over == {"inf": math.inf, "saturate": fmt.max}[fmt.overflow]
    assert quire.matmul(-big, ones, fmt).item() == -over
    back = torch.tensor([[fmt.max, fmt.max, -fmt.max, -fmt.max, fmt.minpos]], dtype=torch.float64)
    assert quire.matmul(back, torch.ones(5, 1, dtype=torch.float64), fmt).item() == fmt.minpos


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([E4M3, E5M2, BF16, Float(3, 2)]), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_mode_none_is_sequential_rounding(fmt, K, seed):
    """No quire: acc = round(acc + round(a_k * b_k)) in order, from 0 (the reference does
    the same with Fractions)."""
    g = torch.Generator().manual_seed(seed)
    a, b = draw(fmt, (3, K), g), draw(fmt, (K, 2), g)
    s = spec(fmt)
    exp = torch.empty(3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            acc = 0.0
            for k in range(K):
                p = ref.round_exact(Fraction(a[i, k].item()) * Fraction(b[k, j].item()), s)
                acc = ref.round_exact(Fraction(acc) + Fraction(p), s) if math.isfinite(p) and math.isfinite(acc) \
                    else ref.round_special(acc + p, s)
            exp[i, j] = acc
    assert_values(quire.matmul(a, b, fmt, mode="none"), exp, f"{fmt} mode none")


@pytest.mark.parametrize("mode", ["float32", "float64"])
def test_float_modes_accumulate_in_that_float(mode):
    g = torch.Generator().manual_seed(3)
    a, b = draw(E4M3, (5, 30), g), draw(E4M3, (30, 4), g)
    dt = torch.float32 if mode == "float32" else torch.float64
    assert_values(quire.matmul(a, b, E4M3, mode=mode), E4M3.round(torch.matmul(a.to(dt), b.to(dt))), mode)


def _ref_conv_terms(x, w, stride, padding, dilation, groups):
    """Per output element the list of (x, w) products of a convolution, by unfolding an
    index tensor (data movement only, so exact)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    idx = (torch.arange(n * c * h * wd, dtype=torch.float64) + 1).view(n, c, h, wd)
    cols = F.unfold(idx, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (n, c*kh*kw, L)
    L = cols.shape[-1]
    xf, wf = x.double().reshape(-1).tolist(), w.double().reshape(o, -1).tolist()
    terms = {}
    for i in range(n):
        for oc in range(o):
            gi = oc // (o // groups)
            for l in range(L):
                t = []
                for r in range(cg * kh * kw):
                    pos = int(cols[i, gi * cg * kh * kw + r, l])
                    if pos:
                        t.append((pos - 1, oc, r))
                terms[(i, oc, l)] = t
    return terms, xf, wf, L


@pytest.mark.parametrize("fmt", [E4M3, E5M2, BF16], ids=str)
@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 1)])
def test_conv2d_and_its_gradients_vs_fraction_reference(fmt, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(stride * 10 + padding + groups)
    x, w = draw(fmt, (2, 4, 6, 5), g), draw(fmt, (4, 4 // groups, 3, 3), g)
    bias = draw(fmt, (4,), g)
    terms, xf, wf, L = _ref_conv_terms(x, w, stride, padding, dilation, groups)
    s = spec(fmt)
    y = quire.conv2d(x, w, bias, fmt, stride, padding, dilation, groups)
    exp = torch.tensor([ref.round_exact(sum((Fraction(xf[p]) * Fraction(wf[oc][r]) for p, oc, r in terms[(i, oc, l)]),
                                            Fraction(bias[oc].item())), s)
                        for (i, oc, l) in sorted(terms)]).view(2, 4, L)
    assert_values(y.reshape(2, 4, -1), exp, f"{fmt} conv2d")
    d = draw(fmt, tuple(y.shape), g)
    df = d.double().reshape(2, 4, -1).tolist()
    gx, gw = {}, {}
    for (i, oc, l), t in terms.items():
        for p, _, r in t:
            gx.setdefault(p, Fraction(0))
            gx[p] += Fraction(df[i][oc][l]) * Fraction(wf[oc][r])
            gw.setdefault((oc, r), Fraction(0))
            gw[(oc, r)] += Fraction(df[i][oc][l]) * Fraction(xf[p])
    exp_x = torch.tensor([ref.round_exact(gx.get(p, Fraction(0)), s) for p in range(x.numel())]).view(x.shape)
    exp_w = torch.tensor([ref.round_exact(gw.get((oc, r), Fraction(0)), s) for oc in range(4)
                          for r in range(w[0].numel())]).view(w.shape)
    got_x = quire.conv2d_input_grad(d, w, x.shape, fmt, stride, padding, dilation, groups)
    got_w = quire.conv2d_weight_grad(x, d, w.shape, fmt, stride, padding, dilation, groups)
    assert_values(got_x, exp_x, f"{fmt} conv2d_input_grad")
    assert_values(got_w, exp_w, f"{fmt} conv2d_weight_grad")


@pytest.mark.parametrize("fmt", [E4M3, FP16], ids=str)
def test_linear_sum_and_dot(fmt):
    g = torch.Generator().manual_seed(11)
    x, w, b = draw(fmt, (3, 20), g), draw(fmt, (4, 20), g), draw(fmt, (4,), g)
    assert_values(quire.linear(x, w, b, fmt), ref_matmul(x, w.t(), fmt, b), "linear")
    ones = torch.ones(20, 1, dtype=torch.float64)
    assert_values(quire.sum(x, 1, fmt), ref_matmul(x, ones, fmt).squeeze(1), "sum")
    assert_values(quire.dot(x[0], w[0], fmt), ref_matmul(x[:1], w[:1].t(), fmt).reshape(()), "dot")


@pytest.mark.parametrize("fmt", [E4M3, E5M2, BF16], ids=str)
def test_incremental_quire(fmt):
    """Quire.add / add_product / sub_product accumulate exactly, round once, and survive a
    state_dict round trip and addition of quires."""
    g = torch.Generator().manual_seed(5)
    a, b, c = draw(fmt, (6, 30), g), draw(fmt, (6, 30), g), draw(fmt, (6,), g)
    q = quire.Quire(fmt, (6,))
    for k in range(30):
        (q.add_product if k % 3 else q.sub_product)(a[:, k], b[:, k])
    q.add(c)
    s = spec(fmt)
    exact = [sum(((1 if k % 3 else -1) * Fraction(a[i, k].item()) * Fraction(b[i, k].item()) for k in range(30)),
                 Fraction(c[i].item())) for i in range(6)]
    assert_values(q.to_format(), torch.tensor([ref.round_exact(e, s) for e in exact]), f"{fmt} Quire")
    r = quire.Quire(fmt, (6,))
    r.load_state_dict(q.state_dict())
    assert_values((r + q).to_format(), torch.tensor([ref.round_exact(2 * e, s) for e in exact]), f"{fmt} Quire sum")
    with pytest.raises(ValueError, match="multiples of minpos"):
        q.add(torch.full((6,), fmt.minpos**2 / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="'format'"):
        quire.Quire(E5M2 if fmt != E5M2 else E4M3, (6,)).load_state_dict(q.state_dict())


def test_nonfinite_inputs_give_nonfinite_outputs():
    """NaN and infinities are not summed exactly: every output they touch is NaN or an
    infinity (fp8e4m3, which has no infinity, reads an inf operand as out of range)."""
    a = torch.tensor([[1.0, float("nan")], [2.0, 3.0], [float("inf"), 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    for fmt in (E5M2, FP16):
        y = quire.matmul(a, b, fmt).squeeze(1)
        assert math.isnan(y[0]) and y[1].item() == 5.0 and not math.isfinite(y[2])
