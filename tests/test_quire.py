"""Oracle tests for positnn.quire against an exact ``fractions.Fraction`` reference.

The reference sums the products exactly (Python integers in a common power-of-two unit),
adds the bias exactly and rounds once with ``posit_reference`` (written from the posit
definition, independent of the library). Every comparison is bit for bit (NaN == NaN).
"""
from __future__ import annotations

import functools
import io
import itertools
import math
import random
from fractions import Fraction

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from positnn import Posit, quire
from posit_reference import Table, decode_pattern, nar_pattern, round_pattern

NAN = float("nan")
FORMATS = [(8, 0), (8, 1), (8, 2), (16, 1), (16, 2), (32, 2), (10, 3), (12, 0)]


def ids(formats):
    return [f"p{n}e{es}" for n, es in formats]


# ============================================================================ reference


@functools.lru_cache(maxsize=None)
def table(n, es) -> Table:
    return Table(n, es)


def ref_round_pattern(x, n, es, underflow=False) -> int:
    if n <= 16:
        return table(n, es).round_fraction(x, underflow)
    return round_pattern(x, n, es, underflow)


def ref_round(x, n, es, underflow=False) -> float:
    """The posit(n, es) nearest to the exact real x (Fraction), as a float (exact)."""
    return float(decode_pattern(ref_round_pattern(Fraction(x), n, es, underflow), n, es))


def _scaled(arr: np.ndarray):
    """Exact integers I and E with arr == I / 2**E (NaN/inf entries -> 0), and the NaR mask."""
    flat = np.asarray(arr, dtype=np.float64).ravel().tolist()
    bad = [not math.isfinite(v) for v in flat]
    ratios = [(0, 1) if b else v.as_integer_ratio() for v, b in zip(flat, bad)]
    E = max([d.bit_length() - 1 for _, d in ratios], default=0)
    ints = np.empty(len(flat), dtype=object)
    ints[:] = [num << (E - (d.bit_length() - 1)) for num, d in ratios]
    return ints.reshape(np.shape(arr)), E, np.array(bad, dtype=bool).reshape(np.shape(arr))


def ref_matmul2d(a, b, fmt, bias=None, underflow=False) -> np.ndarray:
    """Exact a (M, K) @ b (K, N) + bias (N,), rounded once; NaR touches its row/column."""
    n, es = fmt
    A, ea, na = _scaled(a)
    B, eb, nb = _scaled(b)
    M, N = A.shape[0], B.shape[1]
    S = A.dot(B) if A.shape[1] else np.zeros((M, N), dtype=object)
    den = 1 << (ea + eb)
    bad = na.any(axis=1)[:, None] | nb.any(axis=0)[None, :]
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64).reshape(N)
        bad = bad | ~np.isfinite(bias)[None, :]
        bias_f = [Fraction(v) if math.isfinite(v) else None for v in bias.tolist()]
    out = np.empty((M, N))
    for i in range(M):
        for j in range(N):
            if bad[i, j]:
                out[i, j] = NAN
                continue
            x = Fraction(int(S[i, j]), den)
            if bias is not None:
                x += bias_f[j]
            out[i, j] = ref_round(x, n, es, underflow)
    return out


def ref_matmul(a, b, fmt, bias=None, underflow=False) -> np.ndarray:
    """torch.matmul broadcasting semantics on top of ref_matmul2d."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sq_r, sq_c = a.ndim == 1, b.ndim == 1
    a2 = a[None, :] if sq_r else a
    b2 = b[:, None] if sq_c else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a3 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b3 = np.broadcast_to(b2, batch + b2.shape[-2:])
    out = np.empty(batch + (a2.shape[-2], b2.shape[-1]))
    for idx in np.ndindex(*batch):
        out[idx] = ref_matmul2d(a3[idx], b3[idx], fmt, bias, underflow)
    if sq_r:
        out = out[..., 0, :]
    if sq_c:
        out = out[..., 0]
    return out


def ref_dot_terms(pairs, fmt, underflow=False) -> float:
    """Exact rounding of sum(x * y) over float pairs; NaN if any operand is NaR."""
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in pairs):
        return NAN
    return ref_round(sum((Fraction(x) * Fraction(y) for x, y in pairs), Fraction(0)), *fmt, underflow)


def ref_sequential(a, b, fmt, bias=None) -> np.ndarray:
    """mode="none": acc = round(bias) or 0; acc = round(acc + round(a_k b_k)) in order over k."""
    n, es = fmt
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    M, K = a.shape
    N = b.shape[1]
    out = np.empty((M, N))
    for i in range(M):
        for j in range(N):
            terms = [(a[i, k], b[k, j]) for k in range(K)]
            bj = None if bias is None else float(bias[j])
            if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in terms) or (
                bj is not None and not math.isfinite(bj)
            ):
                out[i, j] = NAN
                continue
            acc = Fraction(0) if bj is None else Fraction(ref_round(Fraction(bj), n, es))
            for x, y in terms:
                prod = ref_round(Fraction(x) * Fraction(y), n, es)
                acc = Fraction(ref_round(acc + Fraction(prod), n, es))
            out[i, j] = float(acc)
    return out


def ref_conv2d(x, w, bias, fmt, stride, padding, dilation, groups) -> np.ndarray:
    """Convolution as explicit exact dot products over each output's receptive field
    (zero padding taken literally, as torch.nn.functional.conv2d does)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = O // groups
    out = np.empty((N, O, Ho, Wo))
    for b_, o, i, j in itertools.product(range(N), range(O), range(Ho), range(Wo)):
        g = o // og
        pairs = []
        for c, u, v in itertools.product(range(Cg), range(kh), range(kw)):
            hi, wi = i * sh - ph + u * dh, j * sw - pw + v * dw
            inside = 0 <= hi < H and 0 <= wi < W
            # a padding tap is a zero times the weight (so a NaR weight reaches every output)
            pairs.append((x[b_, g * Cg + c, hi, wi] if inside else 0.0, w[o, c, u, v]))
        if bias is not None:
            pairs.append((float(bias[o]), 1.0))
        out[b_, o, i, j] = ref_dot_terms(pairs, fmt)
    return out


# ============================================================================ helpers


def P(fmt) -> Posit:
    return Posit(*fmt)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def assert_same(got: torch.Tensor, expected: np.ndarray, fmt=None, what=""):
    """Bitwise equality of values (NaN matches NaN), with a readable first-mismatch report."""
    if fmt is not None:
        assert got.dtype == P(fmt).dtype, f"{what}: dtype {got.dtype}, expected {P(fmt).dtype}"
    g = as_np(got)
    e = np.asarray(expected, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape}, expected {e.shape}"
    same = (g == e) | (np.isnan(g) & np.isnan(e))
    if not same.all():
        bad = np.argwhere(~same)
        idx = tuple(bad[0])
        msg = (f"{what} fmt={fmt}: {len(bad)} of {same.size} outputs differ; first at {idx}: "
               f"got {g[idx]!r}, expected {e[idx]!r}")
        raise AssertionError(msg)


def rand_patterns(fmt, shape, zero_frac=0.1, nar=False):
    """Values of uniformly random bit patterns (the whole dynamic range), some zeros."""
    n = fmt[0]
    p = torch.randint(0, 1 << n, shape, dtype=torch.int64)
    if not nar:
        p[p == nar_pattern(n)] = 0
    p[torch.rand(shape) < zero_frac] = 0
    return P(fmt).decode(p)


def rand_logu(fmt, shape, lo, hi, zero_frac=0.0):
    """posit-rounded sign * 2**U(lo, hi): values spread over the binades [lo, hi)."""
    mag = torch.exp2(torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    v = P(fmt).round(sign * mag)
    return torch.where(torch.rand(shape) < zero_frac, torch.zeros_like(v), v)


def next_up(fmt, v):
    """The next posit above each (finite, < maxpos) value; maxpos steps down instead."""
    n = fmt[0]
    pat = P(fmt).encode(v).long() & ((1 << n) - 1)
    top = (1 << (n - 1)) - 1
    return P(fmt).decode(torch.where(pat == top, pat - 1, pat + 1))


def max_exp(fmt):
    n, es = fmt
    return (n - 2) << es


def cancellation_case(fmt, M, K, N, near=True):
    """a (M, K), b (K, N) whose big products cancel exactly (or up to one ulp of b) and
    leave a small remainder; columns shuffled so the big terms are interleaved."""
    E = max_exp(fmt)
    hi = min(E, 60)
    K1 = K // 3
    K2 = K - 2 * K1
    a_big = rand_logu(fmt, (M, K1), hi // 3, hi)
    b_big = rand_logu(fmt, (K1, N), hi // 3, hi)
    b_neg = -b_big
    if near:  # half of the pairs leave a_big * ulp(b_big): tiny, not zero
        mask = torch.rand(K1, N) < 0.5
        b_neg = torch.where(mask, -next_up(fmt, b_big), b_neg)
    a_small = rand_logu(fmt, (M, K2), -hi, -hi // 3, zero_frac=0.1)
    b_small = rand_logu(fmt, (K2, N), -hi, hi // 4, zero_frac=0.1)
    a = torch.cat([a_big, a_big, a_small], dim=1)
    b = torch.cat([b_big, b_neg, b_small], dim=0)
    perm = torch.randperm(K)
    return a[:, perm].contiguous(), b[perm, :].contiguous()


@functools.lru_cache(maxsize=None)
def pow2_exponents(n, es) -> frozenset:
    """Exponents f with 2**f exactly an n-bit posit."""
    E = max_exp((n, es))
    two = Fraction(2)
    return frozenset(f for f in range(-E, E + 1) if decode_pattern(ref_round_pattern(two**f, n, es), n, es) == two**f)


def pow2_as_product(fmt, f):
    """(x, y) with x * y == 2**f, both posits of fmt where possible (near minpos some
    powers of two are no such product; then y is the exact float 2**f / x, which the
    quire accepts as an exact real)."""
    ok = pow2_exponents(*fmt)
    for f1 in sorted(ok, key=lambda g: (abs(2 * g - f), g)):
        if f - f1 in ok:
            return 2.0**f1, 2.0 ** (f - f1)
    f1 = min(ok, key=lambda g: abs(2 * g - f))
    return 2.0**f1, 2.0 ** (f - f1)


def terms_for(fmt, t: Fraction):
    """Pairs whose products sum exactly to the dyadic rational t: one pair per nonzero
    digit of the non-adjacent form of t (signed binary digits)."""
    if t == 0:
        return []
    sign = -1.0 if t < 0 else 1.0
    t = abs(t)
    den_e = t.denominator.bit_length() - 1
    m = t.numerator
    pairs = []
    i = 0
    while m:
        if m & 1:
            d = 2 - (m & 3)  # +1 or -1
            x, y = pow2_as_product(fmt, i - den_e)
            pairs.append((sign * d * x, y))
            m -= d
        m >>= 1
        i += 1
    return pairs


def run_dot_batch(fmt, cases, underflow=False):
    """Each case (a list of float pairs) as one batch entry of a (B, 1, K) @ (B, K, 1)."""
    K = max(len(c) for c in cases)
    a = torch.zeros(len(cases), 1, K, dtype=torch.float64)
    b = torch.zeros(len(cases), K, 1, dtype=torch.float64)
    for i, c in enumerate(cases):
        for k, (x, y) in enumerate(c):
            a[i, 0, k], b[i, k, 0] = x, y
        # padding: 0 * (something nonzero) contributes nothing
        b[i, len(c):, 0] = 3.0
    return quire.matmul(a, b, P(fmt), underflow=underflow)[:, 0, 0]


# ============================================================================ exact matmul


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_matmul_random_patterns(fmt):
    """Whole dynamic range (random patterns, maxpos/minpos included), K from 1 to 4096."""
    for M, K, N in [(1, 1, 1), (3, 1, 5), (4, 7, 3), (5, 33, 6), (3, 257, 2), (2, 4096, 2)]:
        a = rand_patterns(fmt, (M, K))
        b = rand_patterns(fmt, (K, N))
        assert_same(quire.matmul(a, b, P(fmt)), ref_matmul(a, b, fmt), fmt, f"M,K,N={M},{K},{N}")


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_matmul_wide_range_with_bias(fmt):
    E = max_exp(fmt)
    for M, K, N in [(6, 5, 7), (4, 64, 5), (2, 1500, 3)]:
        a = rand_logu(fmt, (M, K), -E, E, zero_frac=0.2)
        b = rand_logu(fmt, (K, N), -E, E, zero_frac=0.2)
        bias = rand_logu(fmt, (N,), -E, E, zero_frac=0.2)
        assert_same(quire.matmul(a, b, P(fmt), bias=bias), ref_matmul(a, b, fmt, bias), fmt, f"{M},{K},{N}")


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_matmul_heavy_cancellation(fmt):
    for M, K, N in [(5, 30, 4), (4, 300, 3), (2, 4096, 2)]:
        a, b = cancellation_case(fmt, M, K, N)
        bias = rand_logu(fmt, (N,), -10, 10)
        exp = ref_matmul(a, b, fmt, bias)
        assert_same(quire.matmul(a, b, P(fmt), bias=bias), exp, fmt, f"cancel {M},{K},{N}")


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_matmul_exact_cancellation_to_zero_and_tiny(fmt):
    """Rows whose sum is exactly 0 give 0; a tiny remainder of huge terms is never lost."""
    f = P(fmt)
    maxpos, minpos = f.maxpos, f.minpos
    x = f.round(torch.tensor(3.0**5, dtype=torch.float64)).item()
    cases = [
        [(maxpos, maxpos), (-maxpos, maxpos)],                              # 0
        [(maxpos, maxpos), (minpos, minpos), (-maxpos, maxpos)],            # minpos**2 -> minpos
        [(maxpos, maxpos), (-minpos, minpos), (maxpos, -maxpos)],           # -minpos
        [(x, x), (x, -x), (1.0, 1.0)],                                      # 1
        [(maxpos, maxpos)] * 5 + [(-maxpos, maxpos)] * 5 + [(minpos, 1.0)],  # minpos
        [(minpos, minpos)],
        [(maxpos, maxpos)],
        [(maxpos, -maxpos)] * 7,
        [(minpos, minpos), (minpos, -minpos)],
        [(0.0, maxpos), (maxpos, 0.0)],
    ]
    got = run_dot_batch(fmt, cases)
    exp = [ref_dot_terms(c, fmt) for c in cases]
    assert exp[0] == 0 and exp[1] == minpos and exp[2] == -minpos and exp[3] == 1.0
    assert exp[5] == minpos and exp[6] == maxpos and exp[7] == -maxpos and exp[8] == 0
    assert_same(got, np.array(exp), fmt, "extreme products")


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_matmul_many_maxpos_products_saturate(fmt):
    f = P(fmt)
    K = 4096
    a = torch.full((2, K), f.maxpos, dtype=torch.float64)
    a[1] = -f.maxpos
    b = torch.full((K, 2), f.maxpos, dtype=torch.float64)
    b[:, 1] = f.minpos
    exp = np.array([[f.maxpos, ref_round(Fraction(K) * Fraction(f.maxpos) * Fraction(f.minpos), *fmt)]])
    exp = np.concatenate([exp, -exp])
    assert_same(quire.matmul(a, b, f), exp, fmt, "K * maxpos**2")


def _midpoint_targets(fmt, rng):
    """(target, expected pattern sanity) for (n+1)-bit midpoints, signed, +-minpos**2 off."""
    n, es = fmt
    top = (1 << (n - 1)) - 1
    ps = sorted({0, 1, 2, 3, top - 3, top - 2, top - 1} | {rng.randrange(1, top) for _ in range(6)})
    mp2 = Fraction(2) ** (-2 * max_exp(fmt))
    out = []
    for p in ps:
        mid = decode_pattern(2 * p + 1, n + 1, es)
        for off in (0, 1, -1):
            for sign in (1, -1):
                out.append((p, off, sign, sign * (mid + off * mp2)))
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
@pytest.mark.parametrize("underflow", [False, True])
def test_matmul_sums_on_midpoints(fmt, underflow):
    """Exact sums on (n+1)-bit midpoints (ties to even, geometric midpoints near the
    ends) and one quire LSB (minpos**2) either side, hidden behind cancelling big terms."""
    rng = random.Random(1000 * fmt[0] + 10 * fmt[1] + underflow)
    f = P(fmt)
    n, es = fmt
    targets = _midpoint_targets(fmt, rng)
    three = ref_round(Fraction(3), n, es)
    big = [(f.maxpos, f.maxpos), (f.maxpos, 1.0), (three, 1.0), (1.0, f.minpos)]
    cases = []
    for p, off, sign, t in targets:
        pairs = terms_for(fmt, t)
        assert sum(Fraction(x) * Fraction(y) for x, y in pairs) == t
        hx, hy = rng.choice(big)
        pairs = pairs + [(hx, hy), (-hx, hy)]
        rng.shuffle(pairs)
        cases.append(pairs)
    got = run_dot_batch(fmt, cases, underflow=underflow)
    exp = np.array([ref_dot_terms(c, fmt, underflow) for c in cases])
    # sanity of the construction: ties go to the even pattern of {p, p+1}
    for (p, off, sign, t), e in zip(targets, exp):
        if off == 0 and p > 0:
            even = p if p % 2 == 0 else p + 1
            assert e == sign * float(decode_pattern(even, n, es))
    assert_same(got, exp, fmt, f"midpoints underflow={underflow}")


MANY_BINADES = [((16, 2), 20), ((32, 2), 100), ((10, 3), 60), ((16, 1), 26), ((8, 2), 20)]


@pytest.mark.parametrize("fmt,spread", MANY_BINADES, ids=[f"p{f[0]}e{f[1]}" for f, _ in MANY_BINADES])
@pytest.mark.parametrize("K", [3, 100, 4096])
def test_matmul_rows_spanning_many_binades(fmt, spread, K):
    """Rows holding both +-2**spread and +-2**-spread scale values (and full-precision
    mantissas): the bits of a row span more than one Ozaki slice (2w + log2 K <= 53)."""
    f = P(fmt)
    M, N = (3, 4) if K < 4096 else (2, 2)
    a = rand_logu(fmt, (M, K), -spread - 4, spread + 4, zero_frac=0.05)
    b = rand_logu(fmt, (K, N), -spread - 4, spread + 4, zero_frac=0.05)
    a[:, 0] = f.round(torch.tensor(2.0**spread * 1.37, dtype=torch.float64))
    a[:, -1] = f.round(torch.tensor(-(2.0**-spread) * 1.61, dtype=torch.float64))
    b[0, :] = f.round(torch.tensor(2.0**-spread * 1.23, dtype=torch.float64))
    b[-1, :] = f.round(torch.tensor(2.0**spread * 1.87, dtype=torch.float64))
    # the data really is too wide for one exact float64 GEMM: span(row) + span(column)
    # + log2 K > 53 for every row/column pair, so the quire must slice
    def span(vals):
        tl = [_span(v) for v in vals if v]
        return max(t for t, _ in tl) - min(lo for _, lo in tl)

    narrowest = min(span(a[i].tolist()) for i in range(M)) + min(span(b[:, j].tolist()) for j in range(N))
    assert narrowest + math.ceil(math.log2(K)) > 53, narrowest
    bias = rand_logu(fmt, (N,), -spread, spread)
    assert_same(quire.matmul(a, b, f, bias=bias), ref_matmul(a, b, fmt, bias), fmt, f"binades K={K}")


@pytest.mark.parametrize("fmt", [(32, 2), (16, 1), (8, 0)], ids=ids([(32, 2), (16, 1), (8, 0)]))
def test_matmul_arbitrary_float64_inputs(fmt):
    """Inputs are taken as exact reals: full 53-bit float64 mantissas over +-2**40."""
    for M, K, N in [(3, 9, 4), (2, 700, 3)]:
        a = torch.randn(M, K, dtype=torch.float64) * torch.exp2(torch.randint(-40, 40, (M, K)).double())
        b = torch.randn(K, N, dtype=torch.float64) * torch.exp2(torch.randint(-40, 40, (K, N)).double())
        bias = torch.randn(N, dtype=torch.float64)
        assert_same(quire.matmul(a, b, P(fmt), bias=bias), ref_matmul(a, b, fmt, bias), fmt, "float64 inputs")


def test_matmul_mixed_input_formats_and_dtypes():
    """a from posit(8,2) in float32, b from posit(32,2) in float64, bias float16; result in (16,1)."""
    fa, fb, fo = (8, 2), (32, 2), (16, 1)
    a = rand_patterns(fa, (4, 50)).float()
    b = rand_patterns(fb, (50, 3)).double()
    bias = torch.tensor([0.5, -3.0, 0.0], dtype=torch.float16)
    assert_same(quire.matmul(a, b, P(fo), bias=bias), ref_matmul(a, b, fo, bias.double()), fo, "mixed")


@pytest.mark.parametrize("fmt", [(8, 1), (16, 2), (32, 2), (12, 0)], ids=ids([(8, 1), (16, 2), (32, 2), (12, 0)]))
def test_matmul_batched_broadcast_and_1d(fmt):
    f = P(fmt)
    shapes = [
        ((2, 3, 4, 5), (5, 6)),
        ((5, 6), (2, 3, 6, 2)),
        ((3, 1, 4, 5), (2, 5, 3)),
        ((2, 1, 3, 7), (1, 4, 7, 2)),
        ((7,), (7,)),
        ((7,), (2, 7, 3)),
        ((2, 3, 7), (7,)),
        ((1,), (1, 4)),
        ((4, 9), (9,)),
    ]
    for sa, sb in shapes:
        a = rand_patterns(fmt, sa)
        b = rand_patterns(fmt, sb)
        got = quire.matmul(a, b, f)
        assert got.shape == torch.matmul(a.double(), b.double()).shape, (sa, sb, got.shape)
        assert_same(got, ref_matmul(a, b, fmt), fmt, f"{sa} @ {sb}")
        if len(sb) >= 2:
            bias = rand_patterns(fmt, (sb[-1],))
            assert_same(quire.matmul(a, b, f, bias=bias), ref_matmul(a, b, fmt, bias), fmt, f"{sa}@{sb}+bias")


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_nar_propagation(fmt):
    """NaN/+-inf in row i of a -> row i NaN; in column j of b or bias[j] -> column j NaN;
    every other output is exact. All modes propagate NaR."""
    f = P(fmt)
    M, K, N = 6, 9, 7
    a = rand_patterns(fmt, (M, K)).double()
    b = rand_patterns(fmt, (K, N)).double()
    bias = rand_patterns(fmt, (N,)).double()
    a[1, 3] = NAN
    a[4, 0] = math.inf
    b[2, 2] = -math.inf
    b[8, 5] = NAN
    bias[6] = NAN
    b[:, 0] = 0.0  # NaR * 0 is still NaR
    exp = ref_matmul(a, b, fmt, bias)
    mask = np.zeros((M, N), dtype=bool)
    mask[[1, 4], :] = True
    mask[:, [2, 5, 6]] = True
    assert np.array_equal(np.isnan(exp), mask)
    assert_same(quire.matmul(a, b, f, bias=bias), exp, fmt, "NaR exact")
    for mode in ("none", "float32", "float64"):
        got = quire.matmul(a, b, f, bias=bias, mode=mode)
        assert got.dtype == f.dtype
        assert np.array_equal(np.isnan(as_np(got)), mask), mode


# ============================================================================ other modes


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_mode_none_matches_sequential_reference(fmt):
    f = P(fmt)
    E = max_exp(fmt)
    # (20, 9, 3): few columns, many rows: the row-blocked loop order (a block of 16 and 4)
    for M, K, N, with_bias in [(3, 1, 2, False), (4, 9, 3, True), (2, 40, 2, True), (20, 9, 3, True)]:
        a = rand_logu(fmt, (M, K), -E // 2, E // 2, zero_frac=0.1)
        b = rand_logu(fmt, (K, N), -E // 2, E // 2, zero_frac=0.1)
        bias = rand_patterns(fmt, (N,)) if with_bias else None
        exp = ref_sequential(a, b, fmt, bias)
        assert_same(quire.matmul(a, b, f, bias=bias, mode="none"), exp, fmt, f"none {M},{K},{N}")
    a, b = cancellation_case(fmt, 2, 30, 2)
    assert_same(quire.matmul(a, b, f, mode="none"), ref_sequential(a, b, fmt), fmt, "none cancel")


def test_paper_example_posit8_0():
    """PositNN: 2*10 + 2*10 + 2*10 + 2*2 is 32 without a quire and exactly 64 with one."""
    f = Posit(8, 0)
    a = torch.tensor([2.0, 2.0, 2.0, 2.0])
    b = torch.tensor([10.0, 10.0, 10.0, 2.0])
    assert quire.dot(a, b, f, mode="none").item() == 32.0
    assert quire.dot(a, b, f).item() == 64.0
    assert quire.matmul(a, b, f, mode="exact").item() == 64.0
    assert ref_sequential(a[None], b[:, None], (8, 0))[0, 0] == 32.0


@pytest.mark.parametrize("fmt", [(16, 2), (32, 2), (8, 2)], ids=ids([(16, 2), (32, 2), (8, 2)]))
def test_float32_mode_differs_from_exact_on_cancellation(fmt):
    """The cancellation data tells the modes apart: float32 accumulation + one rounding is
    wrong on a sizeable share of outputs, while exact matches the Fraction reference."""
    f = P(fmt)
    a, b = cancellation_case(fmt, 16, 96, 16, near=False)
    exact = quire.matmul(a, b, f)
    f32 = quire.matmul(a, b, f, mode="float32")
    assert_same(exact, ref_matmul(a, b, fmt), fmt, "exact")
    differ = int((as_np(exact) != as_np(f32)).sum())
    assert differ >= 16 * 16 // 2, f"float32 differs on only {differ} of 256 outputs"


@pytest.mark.parametrize("fmt", [(8, 0), (16, 1), (32, 2)], ids=ids([(8, 0), (16, 1), (32, 2)]))
@pytest.mark.parametrize("mode", ["float32", "float64"])
def test_float_modes_are_float_matmul_then_one_rounding(fmt, mode):
    f = P(fmt)
    dt = torch.float32 if mode == "float32" else torch.float64
    a = rand_logu(fmt, (2, 5, 30), -8, 8)
    b = rand_logu(fmt, (30, 7), -8, 8)
    bias = rand_logu(fmt, (7,), -8, 8)
    got = quire.matmul(a, b, f, bias=bias, mode=mode)
    exp = f.round(torch.matmul(a.to(dt), b.to(dt)) + bias.to(dt))
    assert got.dtype == f.dtype
    assert torch.equal(got, exp.to(f.dtype))


# ============================================================================ conv2d


CONV_PARAMS = [
    # (N, C, H, W, O, kh, kw, stride, padding, dilation, groups)
    (2, 3, 6, 5, 4, 3, 3, (1, 1), (0, 0), (1, 1), 1),
    (1, 4, 7, 7, 4, 3, 2, (2, 1), (1, 2), (1, 1), 2),
    (2, 4, 8, 6, 6, 2, 3, (1, 2), (2, 1), (2, 1), 2),
    (1, 6, 5, 5, 6, 3, 3, (2, 2), (1, 1), (1, 2), 3),
    (1, 4, 6, 6, 4, 1, 1, (1, 1), (0, 0), (1, 1), 4),
]


@pytest.mark.parametrize("fmt", [(8, 2), (16, 1), (32, 2), (10, 3)], ids=ids([(8, 2), (16, 1), (32, 2), (10, 3)]))
def test_conv2d_vs_explicit_dot_products(fmt):
    f = P(fmt)
    E = max_exp(fmt)
    for N, C, H, W, O, kh, kw, stride, padding, dilation, groups in CONV_PARAMS:
        x = rand_logu(fmt, (N, C, H, W), -E // 2, E // 2, zero_frac=0.1)
        w = rand_logu(fmt, (O, C // groups, kh, kw), -E // 2, E // 2, zero_frac=0.1)
        bias = rand_logu(fmt, (O,), -E // 2, E // 2)
        cg = C // groups
        if cg > 1:  # exact cancellation inside every window: channel 1 of each group
            w[:, 1] = -w[:, 0]  # repeats channel 0 against the negated kernel
            for g in range(groups):
                x[:, g * cg + 1] = x[:, g * cg]
        got = quire.conv2d(x, w, bias, f, stride, padding, dilation, groups)
        exp = ref_conv2d(x, w, bias, fmt, stride, padding, dilation, groups)
        assert got.shape == F.conv2d(x, w, bias, stride, padding, dilation, groups).shape
        assert_same(got, exp, fmt, f"conv {stride} {padding} {dilation} g{groups}")
    # narrow operands (a few binades): span(x) + span(w) + log2 K <= 53 allows a single
    # float64 convolution; the result must still be the exact one, bias inside
    for N, C, H, W, O, kh, kw, stride, padding, dilation, groups in CONV_PARAMS[:3]:
        x = rand_logu(fmt, (N, C, H, W), -2, 2, zero_frac=0.1)
        w = rand_logu(fmt, (O, C // groups, kh, kw), -2, 2, zero_frac=0.1)
        bias = rand_logu(fmt, (O,), -30, 30)
        bias[1] = NAN
        got = quire.conv2d(x, w, bias, f, stride, padding, dilation, groups)
        exp = ref_conv2d(x, w, bias, fmt, stride, padding, dilation, groups)
        assert_same(got, exp, fmt, f"narrow conv {stride} {padding} {dilation} g{groups}")
    # no bias, NaR in one input pixel: only the windows that contain it
    N, C, H, W, O, kh, kw, stride, padding, dilation, groups = CONV_PARAMS[1]
    x = rand_patterns(fmt, (N, C, H, W))
    w = rand_patterns(fmt, (O, C // groups, kh, kw))
    x[0, 3, 2, 4] = NAN
    got = quire.conv2d(x, w, None, f, stride, padding, dilation, groups)
    exp = ref_conv2d(x, w, None, fmt, stride, padding, dilation, groups)
    assert np.isnan(exp).any() and not np.isnan(exp).all()
    assert_same(got, exp, fmt, "conv NaR")
    # NaR in one weight and in one bias entry: their whole output channels
    x[0, 3, 2, 4] = 1.0
    w[0, 1, 1, 0] = math.inf
    bias = rand_patterns(fmt, (O,))
    bias[3] = NAN
    got = quire.conv2d(x, w, bias, f, stride, padding, dilation, groups)
    exp = ref_conv2d(x, w, bias, fmt, stride, padding, dilation, groups)
    assert np.isnan(exp[:, [0, 3]]).all() and not np.isnan(exp[:, [1, 2]]).any()
    assert_same(got, exp, fmt, "conv NaR weight/bias")


def test_conv2d_small_integers_equal_torch_conv2d():
    """Small integers in a wide format: every sum is exact, so the result is torch's."""
    f = Posit(32, 2)
    for N, C, H, W, O, kh, kw, stride, padding, dilation, groups in CONV_PARAMS + [
        (4, 6, 12, 11, 6, 5, 5, (1, 1), (2, 2), (1, 1), 1),
        (2, 8, 10, 10, 4, 3, 3, (2, 1), (1, 1), (2, 2), 2),
    ]:
        x = torch.randint(-4, 5, (N, C, H, W)).double()
        w = torch.randint(-3, 4, (O, C // groups, kh, kw)).double()
        bias = torch.randint(-9, 10, (O,)).double()
        got = quire.conv2d(x, w, bias, f, stride, padding, dilation, groups)
        exp = F.conv2d(x, w, bias, stride, padding, dilation, groups)
        assert got.dtype == f.dtype
        assert torch.equal(got, exp)


# ============================================================================ sum, dot, linear


@pytest.mark.parametrize("binades", [None, 6], ids=["full-range", "6-binades"])
@pytest.mark.parametrize("fmt", [(8, 0), (16, 2), (32, 2), (12, 0)], ids=ids([(8, 0), (16, 2), (32, 2), (12, 0)]))
def test_sum_vs_reference(fmt, binades):
    """Over their whole range posit(16,2) and posit(32,2) sums take the GEMM path; within a few
    binades every format's take the float64 sum (exact in any order)."""
    f = P(fmt)
    E = max_exp(fmt) if binades is None else binades
    x = rand_logu(fmt, (3, 4, 37), -E, E, zero_frac=0.1)
    wide = binades is None and fmt in ((16, 2), (32, 2))  # spans of more than 53 - 6 bits
    assert (quire._float64_sum(x, f, False) is None) == wide
    x[1, 2, :18] = x[1, 2, 19:37]
    x[1, 2, 19:37] *= -1  # a fibre that cancels down to its middle element
    xn = x.double().numpy()
    for dim in (0, 1, 2, -1, -2):
        for keepdim in (False, True):
            got = quire.sum(x, dim, f, keepdim=keepdim)
            moved = np.moveaxis(xn, dim, -1)
            exp = np.empty(moved.shape[:-1])
            for idx in np.ndindex(*exp.shape):
                exp[idx] = ref_dot_terms([(v, 1.0) for v in moved[idx]], fmt)
            if keepdim:
                exp = np.expand_dims(exp, dim)
            assert got.shape == torch.sum(x, dim, keepdim=keepdim).shape
            assert_same(got, exp, fmt, f"sum dim={dim} keepdim={keepdim}")
    assert quire.sum(x, 2, f)[1, 2].item() == x[1, 2, 18].item()


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_dot_vs_reference(fmt):
    f = P(fmt)
    for K in (1, 2, 17, 1000):
        a = rand_patterns(fmt, (K,))
        b = rand_patterns(fmt, (K,))
        got = quire.dot(a, b, f)
        assert got.shape == torch.Size([])
        assert_same(got, np.array(ref_dot_terms(list(zip(a.tolist(), b.tolist())), fmt)), fmt, f"dot K={K}")
    a, b = cancellation_case(fmt, 1, 99, 1)
    a, b = a[0], b[:, 0]
    assert_same(quire.dot(a, b, f), np.array(ref_dot_terms(list(zip(a.tolist(), b.tolist())), fmt)), fmt, "dot cancel")


@pytest.mark.parametrize("fmt", [(8, 2), (16, 1), (32, 2), (10, 3)], ids=ids([(8, 2), (16, 1), (32, 2), (10, 3)]))
def test_linear_vs_reference(fmt):
    f = P(fmt)
    x = rand_patterns(fmt, (5, 20))
    w = rand_patterns(fmt, (7, 20))
    bias = rand_patterns(fmt, (7,))
    assert_same(quire.linear(x, w, bias, f), ref_matmul(x, w.T, fmt, bias), fmt, "linear")
    assert_same(quire.linear(x, w, None, f), ref_matmul(x, w.T, fmt), fmt, "linear no bias")
    x3 = rand_patterns(fmt, (2, 3, 20))
    got = quire.linear(x3, w, bias, f)
    assert got.shape == (2, 3, 7)
    assert_same(got, ref_matmul(x3, w.T, fmt, bias), fmt, "linear 3-D")
    assert_same(quire.linear(x, w, bias, f, mode="none"), ref_sequential(x, w.T, fmt, bias), fmt, "linear none")


# ============================================================================ errors


def test_error_messages():
    f = Posit(16, 1)
    a = torch.ones(3, 4)
    with pytest.raises(ValueError, match="match"):
        quire.matmul(a, torch.ones(5, 2), f)
    with pytest.raises(ValueError, match="mode"):
        quire.matmul(a, torch.ones(4, 2), f, mode="fast")
    with pytest.raises(ValueError, match="mode"):
        quire.sum(a, 0, f, mode="quire")
    with pytest.raises(TypeError):
        quire.matmul(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 2), f)
    with pytest.raises(TypeError):
        quire.matmul(a, torch.ones(4, 2, dtype=torch.int32), f)
    with pytest.raises(TypeError):
        quire.matmul(a, torch.ones(4, 2), f, bias=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError):
        quire.sum(torch.ones(3, dtype=torch.int64), 0, f)
    with pytest.raises(TypeError):
        quire.conv2d(torch.ones(1, 1, 3, 3, dtype=torch.int64), torch.ones(1, 1, 2, 2), None, f)
    with pytest.raises(ValueError, match="bias"):
        quire.matmul(a, torch.ones(4, 2), f, bias=torch.ones(3))
    with pytest.raises(ValueError):
        quire.dot(a, torch.ones(4), f)
    with pytest.raises(ValueError):
        quire.conv2d(torch.ones(1, 3, 5, 5), torch.ones(4, 2, 3, 3), None, f, groups=2)
    with pytest.raises(ValueError):
        quire.linear(torch.ones(2, 5), torch.ones(3, 4), None, f)


def _span(v: float) -> tuple[int, int]:
    """(top, low) of a nonzero finite float: |v| < 2**top, v a multiple of 2**low."""
    num, den = Fraction(v).as_integer_ratio()
    num = abs(num)
    low = (num & -num).bit_length() - 1 - (den.bit_length() - 1)
    return math.floor(math.log2(abs(v))) + 1, low


# Exact mode works in float64: it must raise ValueError when products would leave
# [2**-1074, 2**1020 / K] (module docstring), and compute every other case exactly.
RANGE_OK = [
    (2.0**500, 2.0**500, 1), (2.0**600, 2.0**400, 1), (2.0**509, 2.0**509, 1),
    (2.0**509 * 1.75, 2.0**500, 512), (2.0**-600, 2.0**-474, 1), (2.0**-1070, 1.0, 1),
    (5e-324, 1.0, 3), (2.0**-1000 * (1 + 2.0**-52), 2.0**-22, 2),
]
RANGE_BAD = [
    (2.0**600, 2.0**430, 1), (2.0**509, 2.0**509, 2), (2.0**509 * 1.75, 2.0**500, 1024),
    (2.0**-600, 2.0**-475, 1), (2.0**-1070, 2.0**-10, 1), (5e-324, 0.5, 1),
    (1 + 2.0**-52, 2.0**-1023, 1), (2.0**1000, 2.0**1000, 1),
]


@pytest.mark.parametrize("x,y,K", RANGE_OK, ids=[f"ok{i}" for i in range(len(RANGE_OK))])
def test_exact_mode_accepts_products_in_float64_range(x, y, K):
    (tx, lx), (ty, ly) = _span(x), _span(y)
    assert lx + ly >= -1074 and tx + ty + math.ceil(math.log2(K)) <= 1020
    f = Posit(16, 1)
    a = torch.full((1, K), x, dtype=torch.float64)
    b = torch.full((K, 1), y, dtype=torch.float64)
    exp = ref_round(Fraction(x) * Fraction(y) * K, 16, 1)
    assert quire.matmul(a, b, f).item() == exp
    assert quire.matmul(b.T, a.T, f).item() == exp
    assert quire.matmul(-a, b, f).item() == -exp


@pytest.mark.parametrize("x,y,K", RANGE_BAD, ids=[f"bad{i}" for i in range(len(RANGE_BAD))])
def test_exact_mode_rejects_products_outside_float64_range(x, y, K):
    """Subnormal operands included: a product below 2**-1074 must not silently vanish."""
    (tx, lx), (ty, ly) = _span(x), _span(y)
    assert lx + ly < -1074 or tx + ty + math.ceil(math.log2(K)) > 1020
    f = Posit(16, 1)
    a = torch.full((1, K), x, dtype=torch.float64)
    b = torch.full((K, 1), y, dtype=torch.float64)
    with pytest.raises(ValueError, match="2\\*\\*"):
        quire.matmul(a, b, f)
    with pytest.raises(ValueError, match="2\\*\\*"):
        quire.matmul(b.T, a.T, f)


def test_exact_mode_covers_every_posit_up_to_max_exponent_500():
    """posit(17,5) (max_exponent 480): maxpos**2 * 4096 and minpos**2 fit, results exact."""
    fmt = (17, 5)
    f = P(fmt)
    K = 4096
    a = torch.full((3, K), f.maxpos, dtype=torch.float64)
    a[1] = f.minpos
    a[2, ::2] = -f.maxpos
    a[2, -1] = f.minpos
    b = torch.full((K, 2), f.maxpos, dtype=torch.float64)
    b[:, 1] = f.minpos
    assert_same(quire.matmul(a, b, f), ref_matmul(a, b, fmt), fmt, "posit(17,5) extremes")
    x = rand_patterns(fmt, (3, 300))
    y = rand_patterns(fmt, (300, 2))
    assert_same(quire.matmul(x, y, f), ref_matmul(x, y, fmt), fmt, "posit(17,5) random")


def test_empty_reduction_and_empty_outputs():
    """As torch.matmul: K = 0 is an empty sum (0, plus the bias); M = 0 or N = 0 give
    empty results of the right shape."""
    f = Posit(16, 1)
    bias = torch.tensor([3.0, -0.0, 1e-30])
    got = quire.matmul(torch.zeros(2, 0), torch.zeros(0, 3), f, bias=bias)
    assert_same(got, np.array([[3.0, 0.0, f.minpos]] * 2), (16, 1), "K=0 with bias")
    assert_same(quire.matmul(torch.zeros(2, 0), torch.zeros(0, 3), f), np.zeros((2, 3)), (16, 1), "K=0")
    assert quire.matmul(torch.zeros(0, 4), torch.ones(4, 3), f).shape == (0, 3)
    assert quire.matmul(torch.ones(2, 4), torch.ones(4, 0), f).shape == (2, 0)
    assert_same(quire.sum(torch.zeros(3, 0), 1, f), np.zeros(3), (16, 1), "empty sum")


def test_non_contiguous_operands():
    fmt = (16, 2)
    f = P(fmt)
    base_a = rand_patterns(fmt, (9, 12))
    base_b = rand_patterns(fmt, (14, 10))
    a = base_a.T[::2]            # (6, 9), strided
    b = base_b[1:10, ::3]        # (9, 4), strided
    bias = rand_patterns(fmt, (8,))[::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_same(quire.matmul(a, b, f, bias=bias), ref_matmul(a, b, fmt, bias), fmt, "strided")
    ab = rand_patterns(fmt, (3, 9)).expand(2, 3, 9)  # stride-0 batch
    assert_same(quire.matmul(ab, b, f), ref_matmul(ab, b, fmt), fmt, "expanded batch")


# ============================================================================ determinism


def test_exact_is_deterministic_across_threads_and_batch_splits():
    fmt = (32, 2)
    f = P(fmt)
    a = rand_logu(fmt, (8, 6, 1024), -100, 100, zero_frac=0.05)
    b = rand_logu(fmt, (1024, 10), -100, 100, zero_frac=0.05)
    a[..., :200], b[:200] = a[..., 200:400], -b[200:400]  # cancellation
    bias = rand_logu(fmt, (10,), -20, 20)
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            numba.set_num_threads(min(t, numba.config.NUMBA_NUM_THREADS))
            results.append(quire.matmul(a, b, f, bias=bias))
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)
    whole = results[0]
    assert torch.equal(whole.view(torch.int64), results[1].view(torch.int64))
    halves = torch.cat([quire.matmul(a[:4], b, f, bias=bias), quire.matmul(a[4:], b, f, bias=bias)])
    assert torch.equal(whole.view(torch.int64), halves.view(torch.int64))
    rows = torch.cat([quire.matmul(a[:, :1], b, f, bias=bias), quire.matmul(a[:, 1:], b, f, bias=bias)], dim=1)
    assert torch.equal(whole.view(torch.int64), rows.view(torch.int64))
    # only one row holds the extreme values: the other half needs fewer slices
    a2 = a.clone()
    a2[:4] = f.round(a2[:4].clamp(-4, 4))
    whole2 = quire.matmul(a2, b, f)
    halves2 = torch.cat([quire.matmul(a2[:4], b, f), quire.matmul(a2[4:], b, f)])
    assert torch.equal(whole2.view(torch.int64), halves2.view(torch.int64))
    assert_same(whole[3], ref_matmul(a[3], b, fmt, bias), fmt, "determinism vs reference")


# ============================================================================ Quire class


@pytest.mark.parametrize("fmt", FORMATS, ids=ids(FORMATS))
def test_quire_incremental_equals_matmul(fmt):
    f = P(fmt)
    M, K, N = 3, 24, 4
    a, b = cancellation_case(fmt, M, K, N)
    bias = rand_patterns(fmt, (N,))
    q = quire.Quire(f, (M, N))
    q.add(bias)
    for k in range(K):
        q.add_product(a[:, k:k + 1], b[k:k + 1, :])
    got = q.to_posit()
    exact = quire.matmul(a, b, f, bias=bias)
    assert got.shape == (M, N) and got.dtype == f.dtype
    assert torch.equal(got, exact)
    assert_same(got, ref_matmul(a, b, fmt, bias), fmt, "Quire incremental")
    # sub_product undoes add_product: remove the last 5 terms
    for k in range(K - 5, K):
        q.sub_product(a[:, k:k + 1], b[k:k + 1, :])
    assert_same(q.to_posit(), ref_matmul(a[:, :K - 5], b[:K - 5], fmt, bias), fmt, "after sub_product")


@pytest.mark.parametrize("fmt", [(8, 0), (16, 2), (32, 2), (10, 3)], ids=ids([(8, 0), (16, 2), (32, 2), (10, 3)]))
def test_quire_sum_of_quires_and_state_dict(fmt):
    f = P(fmt)
    M, K, N = 4, 16, 3
    a = rand_patterns(fmt, (M, K))
    b = rand_patterns(fmt, (K, N))
    h = K // 2
    q1, q2, qall = (quire.Quire(f, (M, N)) for _ in range(3))
    for k in range(K):
        (q1 if k < h else q2).add_product(a[:, k:k + 1], b[k:k + 1])
        qall.add_product(a[:, k:k + 1], b[k:k + 1])
    # one half negated: partial sums of opposite signs
    qneg = quire.Quire(f, (M, N))
    for k in range(h, K):
        qneg.sub_product(a[:, k:k + 1], b[k:k + 1])
    s = q1 + q2
    assert isinstance(s, quire.Quire)
    assert torch.equal(s.to_posit(), qall.to_posit())
    assert torch.equal(s.to_posit(), quire.matmul(a, b, f))
    bneg = torch.cat([b[:h], -b[h:]])
    assert_same((q1 + qneg).to_posit(), ref_matmul(a, bneg, fmt), fmt, "q1 + qneg")
    assert_same((qneg + q2).to_posit(), np.zeros((M, N)), fmt, "q + (-q)")
    # a chain of sums, then further adds
    chain = q1 + q2 + qneg + q2
    chain.add_product(a[:, :1], b[:1])
    ref = ref_matmul(torch.cat([a, a[:, :1]], 1), torch.cat([b, b[:1]]), fmt)
    assert_same(chain.to_posit(), ref, fmt, "chain")
    # state_dict round trip, through torch.save, then continue accumulating
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    r = quire.Quire(f, (M, N))
    r.load_state_dict(torch.load(buf))
    assert torch.equal(r.to_posit(), s.to_posit())
    r.add_product(a[:, :1], b[:1])
    assert_same(r.to_posit(), ref, fmt, "restored + more")
    with pytest.raises(ValueError):
        quire.Quire(Posit(fmt[0], (fmt[1] + 1) % 4), (M, N)).load_state_dict(s.state_dict())
    with pytest.raises(ValueError):
        quire.Quire(f, (N, M)).load_state_dict(s.state_dict())
    with pytest.raises(TypeError):
        q1 + quire.Quire(Posit(fmt[0], (fmt[1] + 1) % 4), (M, N))
    # clear, then reuse
    s.clear()
    assert torch.equal(s.to_posit(), torch.zeros(M, N, dtype=f.dtype))
    s.add(torch.full((N,), f.minpos, dtype=torch.float64))
    s.add_product(a[:, 1:2], b[1:2])
    assert_same(s.to_posit(), ref_matmul(a[:, 1:2], b[1:2], fmt, torch.full((N,), f.minpos)), fmt, "after clear")


@pytest.mark.parametrize("fmt", [(8, 0), (8, 2), (16, 1), (32, 2)], ids=ids([(8, 0), (8, 2), (16, 1), (32, 2)]))
def test_quire_extremes_and_invalid_terms(fmt):
    f = P(fmt)
    mp2 = f.minpos**2

    def T(v):  # float64: minpos**2 of posit(32,2) is 2**-240, below float32's range
        return torch.tensor(v, dtype=torch.float64)

    q = quire.Quire(f, (3,))
    q.add_product(T([f.maxpos, f.minpos, 0.0]), T([f.maxpos, -f.minpos, f.maxpos]))
    assert q.to_posit().tolist() == [f.maxpos, -f.minpos, 0.0]
    q.sub_product(T(f.maxpos), T(f.maxpos))  # broadcast scalar
    q.add(T([mp2, 0.0, 3 * mp2]))  # multiples of minpos**2, not posits
    big2 = Fraction(f.maxpos) ** 2
    exp = [Fraction(mp2), -Fraction(mp2) - big2, 3 * Fraction(mp2) - big2]
    assert_same(q.to_posit(), np.array([ref_round(x, *fmt) for x in exp]), fmt, "quire extremes")
    assert_same(q.to_posit(underflow=True), np.array([ref_round(x, *fmt, underflow=True) for x in exp]), fmt,
                "quire extremes, underflow")
    assert q.to_posit(underflow=True)[0].item() == 0.0
    state = q.state_dict()["limbs"].clone()
    for bad in (T(mp2 / 2), T([0.0, mp2 * 1.5, 0.0])):
        with pytest.raises(ValueError):
            quire.Quire(f, (3,)).add(bad)
    with pytest.raises(ValueError):  # product of two non-posits below minpos**2
        quire.Quire(f, (3,)).add_product(T(f.minpos / 2), T(f.minpos))
    with pytest.raises(ValueError):
        q.add(T([0.0, NAN, 0.0]))
    with pytest.raises(ValueError):
        q.add_product(T([1.0, 1.0, math.inf]), T(1.0))
    with pytest.raises(TypeError):
        q.add(torch.ones(3, dtype=torch.int64))
    # a rejected add is all or nothing: the valid elements are not added either
    with pytest.raises(ValueError):
        q.add(T([1.0, mp2 / 4, 1.0]))
    with pytest.raises(ValueError):
        q.add(T([1.0, NAN, 1.0]))
    assert torch.equal(q.state_dict()["limbs"], state)
    assert_same(q.to_posit(), np.array([ref_round(x, *fmt) for x in exp]), fmt, "after rejected adds")


def test_quire_many_maxpos_products_then_cancel():
    """2**12 products maxpos**2 of posit(32,2) (2**252 in all, built by doubling quires
    with ``+``) and one minpos**2 (2**-240): the quire keeps all 492 bits; cancelling
    the big ones again leaves exactly minpos**2."""
    f = Posit(32, 2)
    big = torch.tensor([f.maxpos, -f.maxpos], dtype=torch.float64)
    pos, neg = quire.Quire(f, (2,)), quire.Quire(f, (2,))
    pos.add_product(big, torch.tensor(f.maxpos, dtype=torch.float64))
    neg.sub_product(big, torch.tensor(f.maxpos, dtype=torch.float64))
    for _ in range(12):
        pos, neg = pos + pos, neg + neg
    q = pos + quire.Quire(f, (2,))
    q.add_product(torch.tensor(f.minpos), torch.tensor(f.minpos))
    assert q.to_posit().tolist() == [f.maxpos, -f.maxpos]
    assert (q + neg).to_posit().tolist() == [f.minpos, f.minpos]
    assert (neg + q).to_posit().tolist() == [f.minpos, f.minpos]
    q.add_product(torch.tensor(f.maxpos), torch.tensor([-f.maxpos, f.maxpos]))
    assert (q + neg).to_posit().tolist() == [-f.maxpos, f.maxpos]


# ============================================================================ hypothesis


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_hypothesis_posit8_matmul_matches_reference(data):
    es = data.draw(st.integers(0, 3), label="es")
    fmt = (8, es)
    M = data.draw(st.integers(1, 5), label="M")
    K = data.draw(st.integers(1, 12), label="K")
    N = data.draw(st.integers(1, 5), label="N")
    pat = st.integers(0, 255)
    pa = data.draw(st.lists(pat, min_size=M * K, max_size=M * K), label="a")
    pb = data.draw(st.lists(pat, min_size=K * N, max_size=K * N), label="b")
    with_bias = data.draw(st.booleans(), label="bias")
    f = P(fmt)

    def dec(pats, shape):
        vals = [NAN if decode_pattern(p, 8, es) is None else float(decode_pattern(p, 8, es)) for p in pats]
        return torch.tensor(vals, dtype=torch.float32).view(shape)

    a = dec(pa, (M, K))
    b = dec(pb, (K, N))
    bias = dec(data.draw(st.lists(pat, min_size=N, max_size=N), label="bias values"), (N,)) if with_bias else None
    assert_same(quire.matmul(a, b, f, bias=bias), ref_matmul(a, b, fmt, bias), fmt, "hypothesis")
