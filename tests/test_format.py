"""Oracle tests for positnn.format.Posit against the exact Fraction reference (posit_reference.py)."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from positnn import Posit
from posit_reference import (
    Table,
    all_values,
    decode_pattern,
    nar_pattern,
    round_pattern,
    round_sqrt_pattern,
    significand_bits,
)

NAN = float("nan")
ALL_FORMATS = [(n, es) for n in range(2, 33) for es in range(6)]
SMALL_FORMATS = [(n, es) for n in range(2, 11) for es in range(6)]
DECODE_FORMATS = [(n, es) for n in range(2, 13) for es in range(6)]
SAMPLED_FORMATS = [(13, 3), (16, 1), (16, 2), (27, 4), (32, 2)]
EXHAUSTIVE_ARITH = [(n, es) for n in range(2, 9) for es in range(4)]
LARGE_ARITH = [(16, 1), (27, 4), (32, 2), (32, 0), (31, 3)]


def ids(formats):
    return [f"p{n}e{es}" for n, es in formats]


# ----------------------------------------------------------------------------- helpers


def mask(n):
    return (1 << n) - 1


def signed(p, n):
    """The n-bit pattern p as a signed (two's complement) integer."""
    p &= mask(n)
    return p - (1 << n) if p >> (n - 1) else p


def top(n):
    return (1 << (n - 1)) - 1


@functools.lru_cache(maxsize=None)
def table(n, es) -> Table:
    return Table(n, es)


def ref_float(p, n, es) -> float:
    v = decode_pattern(p, n, es)
    return NAN if v is None else float(v)


def ref_round_pattern(x, n, es, underflow=False) -> int:
    """Reference rounding of a real (Fraction); table fast path for small n."""
    if n <= 12:
        return table(n, es).round_fraction(x, underflow)
    return round_pattern(x, n, es, underflow)


def ref_round_float(x: float, n, es, underflow=False) -> float:
    if math.isnan(x) or math.isinf(x):
        return NAN
    return ref_float(ref_round_pattern(Fraction(x), n, es, underflow), n, es)


def boundary(r, n, es) -> Fraction:
    """Midpoint between the n-bit posits with signed patterns r and r+1: the (n+1)-bit
    pattern 2r+1."""
    return decode_pattern((2 * r + 1) & mask(n + 1), n + 1, es)


def patterns_near(x: Fraction, n, es):
    """Patterns (unsigned) of round(x) and of its two neighbours, NaR excluded."""
    s = signed(ref_round_pattern(x, n, es), n)
    return [q & mask(n) for q in (s - 1, s, s + 1) if -top(n) <= q <= top(n)]


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


def assert_values_equal(got, expected, fmt, *inputs, what=""):
    """got must have fmt.dtype and equal expected (float64, NaN = NaR) element for element."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got)}"
    assert got.dtype == fmt.dtype, f"{fmt} {what}: dtype {got.dtype}, expected {fmt.dtype}"
    assert got.shape == expected.shape, f"{fmt} {what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    g = got.double()
    bad = ~((g == expected) | (torch.isnan(g) & torch.isnan(expected)))
    if bad.any():
        ins = torch.broadcast_tensors(*[i.double() for i in inputs]) if inputs else []
        lines = []
        for idx in bad.nonzero()[:10].tolist():
            idx = tuple(idx)
            args = ", ".join(repr(i[idx].item()) for i in ins)
            lines.append(f"  {what}({args}) = {g[idx].item()!r}, expected {expected[idx].item()!r}")
        pytest.fail(f"{fmt} {what}: {int(bad.sum())} of {bad.numel()} wrong:\n" + "\n".join(lines))


def random_patterns(n, count, rng):
    """Half uniform patterns, half with a 2-bit regime (the most significand bits)."""
    out = []
    for i in range(count):
        p = rng.getrandbits(n)
        if i % 2 and n >= 4:
            p = (p & ~(0b11 << (n - 3))) | (rng.choice((0b10, 0b01)) << (n - 3))
        out.append(p)
    return out


# ------------------------------------------------------------------ the reference itself


@pytest.mark.parametrize("n,es", DECODE_FORMATS, ids=ids(DECODE_FORMATS))
def test_reference_table_matches_bisection(n, es):
    """The integer fast path of the reference agrees with its definitional bisection."""
    t, rng = table(n, es), random.Random(n * 10 + es)
    vals = [v for v in all_values(n, es) if v]
    rs = range(-top(n), top(n))
    xs = [boundary(r, n, es) for r in (rs if len(rs) <= 512 else rng.sample(rs, 512))]
    xs += [rng.choice(vals) * Fraction(rng.randint(1, 999), rng.randint(1, 999)) for _ in range(150)]
    xs += [x + d for x in xs[:50] for d in (Fraction(1, 10**40), -Fraction(1, 10**40))]
    for x in xs:
        for u in (False, True):
            assert t.round_fraction(x, u) == round_pattern(x, n, es, u), (x, u)
    for u in range(64):
        assert t.round_sqrt_units(u) == round_sqrt_pattern(Fraction(u, 2**t.S), n, es)


def test_reference_known_facts():
    assert decode_pattern(1, 8, 0) == Fraction(1, 64) and decode_pattern(0x7F, 8, 0) == 64
    assert decode_pattern(0x7FFF, 16, 1) == 2**28 and decode_pattern(1, 32, 2) == Fraction(1, 2**120)
    assert decode_pattern(0x40, 8, 0) == 1 and decode_pattern(0xC0, 8, 0) == -1
    assert decode_pattern(0x80, 8, 0) is None and decode_pattern(0, 8, 0) == 0
    assert round_pattern(20, 8, 0) == round_pattern(16, 8, 0)            # the paper's tie
    # geometric midpoint near maxpos of posit(8,2): between 2^20 and 2^24 lies 2^22
    assert boundary(0x7E, 8, 2) == 2**22
    assert decode_pattern(round_pattern(2**22 + 1, 8, 2), 8, 2) == 2**24
    assert decode_pattern(round_pattern(2**22 - 1, 8, 2), 8, 2) == 2**20


# --------------------------------------------------------------- construction and parsing


def test_construct_all_formats():
    for n, es in ALL_FORMATS:
        f = Posit(n, es)
        assert (f.nbits, f.es) == (n, es)
        assert repr(f) == f"Posit({n}, {es})"
        assert Posit.parse(f"posit({n},{es})") == f
        assert Posit.parse(f"p{n}e{es}") == f


@pytest.mark.parametrize(
    "n,es,field",
    [(1, 0, "nbits"), (0, 2, "nbits"), (-8, 2, "nbits"), (33, 2, "nbits"), (64, 0, "nbits"),
     (8, -1, "es"), (8, 6, "es"), (32, 7, "es")],
)
def test_invalid_format_raises(n, es, field):
    with pytest.raises(ValueError) as info:
        Posit(n, es)
    msg = str(info.value)
    if field == "nbits":
        assert "2" in msg and "32" in msg, msg
    else:
        assert "0" in msg and "5" in msg, msg


def test_frozen_hashable_equal():
    f = Posit(8, 2)
    assert dataclasses.is_dataclass(f)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.nbits = 16
    assert f == Posit(8, 2) and f != Posit(8, 1) and f != Posit(9, 2)
    assert hash(f) == hash(Posit(8, 2))
    assert len({Posit(8, 2), Posit(8, 2), Posit(8, 1), Posit(16, 1)}) == 3
    assert {Posit(8, 2): "a"}[Posit(8, 2)] == "a"
    assert repr(Posit(8, 2)) == "Posit(8, 2)"


def test_parse_examples():
    assert Posit.parse("posit(8,2)") == Posit(8, 2)
    assert Posit.parse("p8e2") == Posit(8, 2)
    assert Posit.parse("p16e1") == Posit(16, 1)
    assert Posit.parse("posit(32,5)") == Posit(32, 5)


@pytest.mark.parametrize(
    "text",
    ["", "posit", "posit(8)", "p8", "q8e2", "posit(8,2,1)", "p8e2x", "p33e2", "p1e0", "p8e6",
     "posit(a,b)", "8,2", "posit(-8,2)", "p8e-1", "posit(8,9)"],
)
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        Posit.parse(text)


# ------------------------------------------------------------------------ constants


def test_constants_all_formats():
    for n, es in ALL_FORMATS:
        f = Posit(n, es)
        mn, mx = decode_pattern(1, n, es), decode_pattern(top(n), n, es)
        assert f.useed == 2 ** 2 ** es and type(f.useed) is int, (n, es)
        assert type(f.minpos) is float and Fraction(f.minpos) == mn, (n, es, f.minpos)
        assert type(f.maxpos) is float and Fraction(f.maxpos) == mx, (n, es, f.maxpos)
        # the most precise values are those with the shortest regime, e.g. the value 1
        msb = significand_bits(1 << (n - 2), n, es)
        assert f.max_significand_bits == msb, (n, es)
        exact32 = mx <= 2**126 and msb <= 24
        assert f.dtype == (torch.float32 if exact32 else torch.float64), (n, es)
        assert f.storage_dtype == (torch.int8 if n <= 8 else torch.int16 if n <= 16 else torch.int32)
        assert f.quire_bits == (16 * n if es == 2 else 2**es * (4 * n - 8) + 31), (n, es)


def test_max_significand_bits_is_a_maximum():
    """Reference self-check: pattern 010...0 has the most significand bits (n <= 12)."""
    for n, es in DECODE_FORMATS:
        best = max(significand_bits(p, n, es) for p in range(1, 1 << n) if p != nar_pattern(n))
        assert best == significand_bits(1 << (n - 2), n, es) == max(1, n - 2 - es)


def test_known_constants():
    assert Posit(8, 0).minpos == 2.0**-6 and Posit(8, 0).maxpos == 2.0**6
    assert Posit(16, 1).maxpos == 2.0**28 and Posit(16, 1).minpos == 2.0**-28
    assert Posit(32, 2).minpos == 2.0**-120 and Posit(32, 2).maxpos == 2.0**120
    assert Posit(8, 0).max_significand_bits == 6
    assert Posit(16, 1).max_significand_bits == 13
    assert Posit(32, 2).max_significand_bits == 28
    assert Posit(8, 2).quire_bits == 128 and Posit(32, 2).quire_bits == 512
    assert Posit(8, 2).dtype == torch.float32 and Posit(32, 2).dtype == torch.float64
    assert Posit(8, 5).dtype == torch.float64                     # maxpos = 2**192


@pytest.mark.parametrize("n,es", SMALL_FORMATS + [(16, 1), (12, 5)], ids=ids(SMALL_FORMATS + [(16, 1), (12, 5)]))
def test_values(n, es):
    f = Posit(n, es)
    got = f.values()
    expected = f64([ref_float(p, n, es) for p in range(1 << n)])
    assert_values_equal(got, expected, f, what="values()")
    if f.dtype == torch.float32:       # the dtype rule's promise: values are exact float32
        assert torch.equal(expected.float().double()[~expected.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("n", [17, 24, 32])
def test_values_rejects_large(n):
    with pytest.raises(ValueError):
        Posit(n, 2).values()


# ------------------------------------------------------------------- decode / encode


def check_decode_encode(f, pats):
    n, es = f.nbits, f.es
    expected = f64([ref_float(p, n, es) for p in pats])
    bits = torch.tensor([signed(p, n) for p in pats], dtype=f.storage_dtype)
    got = f.decode(bits)
    assert_values_equal(got, expected, f, bits, what="decode")
    # decode reads the low nbits of any integer tensor
    unsigned = torch.tensor(pats, dtype=torch.int64)
    assert_values_equal(f.decode(unsigned), expected, f, unsigned, what="decode(int64 unsigned)")
    junk = torch.randint(0, 2 ** (62 - n), (len(pats),), dtype=torch.int64) << n
    assert_values_equal(f.decode(unsigned + junk), expected, f, unsigned + junk, what="decode(high junk)")
    if n <= 8:
        u8 = torch.tensor(pats, dtype=torch.uint8)
        assert_values_equal(f.decode(u8), expected, f, u8, what="decode(uint8)")
    enc = f.encode(got)
    assert enc.dtype == f.storage_dtype
    if not torch.equal(enc, bits):
        i = int((enc != bits).nonzero()[0, 0])
        pytest.fail(f"{f} encode({got[i].item()!r}) = {enc[i].item()}, expected {bits[i].item()}")
    enc64 = f.encode(expected)                           # float64 input works too
    assert torch.equal(enc64, bits)


@pytest.mark.parametrize("n,es", DECODE_FORMATS, ids=ids(DECODE_FORMATS))
def test_decode_encode_exhaustive(n, es):
    check_decode_encode(Posit(n, es), list(range(1 << n)))


def test_decode_encode_posit16_1_exhaustive():
    check_decode_encode(Posit(16, 1), list(range(1 << 16)))


RANDOM_DECODE = [(13, 3), (16, 2), (20, 0), (24, 5), (27, 4), (31, 3), (32, 0), (32, 2), (32, 5)]


@pytest.mark.parametrize("n,es", RANDOM_DECODE, ids=ids(RANDOM_DECODE))
def test_decode_encode_random(n, es):
    rng = random.Random(n * 7 + es)
    special = [0, 1, 2, top(n), top(n) - 1, nar_pattern(n), nar_pattern(n) + 1, mask(n), 1 << (n - 2)]
    check_decode_encode(Posit(n, es), special + random_patterns(n, 4000, rng))


@pytest.mark.parametrize("n,es", LARGE_ARITH + [(32, 5)], ids=ids(LARGE_ARITH + [(32, 5)]))
def test_neg_abs_random(n, es):
    f = Posit(n, es)
    v = f64([ref_float(p, n, es) for p in random_patterns(n, 3000, random.Random(n + es))])
    a = v.to(f.dtype)
    assert_values_equal(f.neg(a), -v, f, a, what="neg")
    assert_values_equal(f.abs(a), v.abs(), f, a, what="abs")


def test_nar_pattern_sign_extended():
    for n, es, nar in [(8, 0, -128), (16, 1, -32768), (32, 2, -(2**31)), (6, 1, -32), (3, 0, -4), (20, 3, -(2**19))]:
        f = Posit(n, es)
        out = f.encode(f64([NAN]).to(f.dtype))
        assert out.dtype == f.storage_dtype and out.item() == nar, (n, es, out)
        assert math.isnan(f.decode(out).item())
        assert f.encode(f64([-0.0]).to(f.dtype)).item() == 0


# ------------------------------------------------------------------------ rounding


def rounding_inputs(n, es, pats):
    """Floats at each (n+1)-bit midpoint next to the positive patterns ``pats``, their
    float64 neighbours, the posits themselves and their neighbours, plus special values;
    all mirrored to negative."""
    xs = []
    for p in pats:
        for v in (decode_pattern(p, n, es), boundary(p, n, es) if p < top(n) else None):
            if v is not None:
                x = float(v)
                xs += [x, math.nextafter(x, 0.0), math.nextafter(x, math.inf)]
    mn, mx = float(decode_pattern(1, n, es)), float(decode_pattern(top(n), n, es))
    ufl = float(decode_pattern(1, n + 1, es))          # minpos / useed
    xs += [0.0, mn, mx, ufl, math.nextafter(ufl, 0.0), math.nextafter(ufl, 1.0), ufl / 2, ufl * 1.5,
           mn * 0.75, math.nextafter(mn, 0.0), math.nextafter(mx, math.inf), mx * 1.5, mx * 4,
           1e300, 1e-300, 5e-324, 1.0, 3.0, 0.1]
    xs = xs + [-x for x in xs]
    return xs + [math.inf, -math.inf, NAN]


def check_round(f, xs, underflow, dtype=torch.float64):
    n, es = f.nbits, f.es
    x = torch.tensor(xs, dtype=dtype)
    expected = f64([ref_round_float(float(v), n, es, underflow) for v in x.double().tolist()])
    assert_values_equal(f.round(x, underflow=underflow), expected, f, x, what=f"round[underflow={underflow}]")


def float32_exact(xs):
    with np.errstate(over="ignore"):
        return [x for x in xs if math.isnan(x) or float(np.float32(x)) == x]


@pytest.mark.parametrize("underflow", [False, True])
@pytest.mark.parametrize("n,es", SMALL_FORMATS, ids=ids(SMALL_FORMATS))
def test_round_midpoints_small(n, es, underflow):
    f = Posit(n, es)
    xs = rounding_inputs(n, es, range(1, top(n) + 1))
    check_round(f, xs, underflow)
    check_round(f, float32_exact(xs), underflow, torch.float32)


@pytest.mark.parametrize("underflow", [False, True])
@pytest.mark.parametrize("n,es", SAMPLED_FORMATS, ids=ids(SAMPLED_FORMATS))
def test_round_midpoints_sampled(n, es, underflow):
    f, rng = Posit(n, es), random.Random(n + 100 * es)
    pats = {1, 2, 3, top(n), top(n) - 1, top(n) - 2, 1 << (n - 2)}
    pats |= {p for p in random_patterns(n - 1, 400, rng) if p}       # positive patterns
    xs = rounding_inputs(n, es, sorted(pats))
    check_round(f, xs, underflow)
    check_round(f, float32_exact(xs), underflow, torch.float32)


ALL_LARGE = [(n, es) for n in range(11, 33) for es in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("n,es", ALL_LARGE, ids=ids(ALL_LARGE))
def test_round_midpoints_all_large_slow(n, es):
    f, rng = Posit(n, es), random.Random(n + 1000 * es)
    pats = {1, 2, 3, top(n), top(n) - 1, top(n) - 2, 1 << (n - 2)}
    pats |= {p for p in random_patterns(n - 1, 1500, rng) if p}
    xs = rounding_inputs(n, es, sorted(pats))
    for underflow in (False, True):
        check_round(f, xs, underflow)
        check_round(f, float32_exact(xs), underflow, torch.float32)


LOGUNIFORM_FORMATS = SMALL_FORMATS[::5] + SAMPLED_FORMATS + [(32, 5), (32, 0), (31, 3)]


@pytest.mark.parametrize("underflow", [False, True])
@pytest.mark.parametrize("n,es", LOGUNIFORM_FORMATS, ids=ids(LOGUNIFORM_FORMATS))
def test_round_random_loguniform(n, es, underflow):
    f, rng = Posit(n, es), random.Random(n * 13 + es)
    span = (n - 2) * 2**es + 12                          # beyond minpos .. maxpos
    xs = [rng.choice((-1, 1)) * (1 + rng.random()) * 2.0 ** rng.uniform(-span, span) for _ in range(1500)]
    check_round(f, xs, underflow)
    with np.errstate(over="ignore"):
        check_round(f, float32_exact([float(np.float32(x)) for x in xs]), underflow, torch.float32)


def test_round_paper_example():
    f = Posit(8, 0)
    assert f.round(f64([20.0])).item() == 16.0
    assert f.mul(f64([2.0]), f64([10.0])).item() == 16.0
    assert f.add(f64([16.0]), f64([16.0])).item() == 32.0


def test_round_saturates_never_zero():
    for n, es in [(8, 0), (16, 1), (32, 2), (32, 5), (5, 3)]:
        f = Posit(n, es)
        x = f64([1e-300, -1e-300, 5e-324, 1e300, -1e300, math.inf, -math.inf, NAN, 0.0])
        exp = f64([f.minpos, -f.minpos, f.minpos, f.maxpos, -f.maxpos, NAN, NAN, NAN, 0.0])
        assert_values_equal(f.round(x), exp, f, x, what="round")
        exp_u = f64([0.0, 0.0, 0.0, f.maxpos, -f.maxpos, NAN, NAN, NAN, 0.0])
        assert_values_equal(f.round(x, underflow=True), exp_u, f, x, what="round[underflow]")


# layout: strides, views, shapes, low-precision inputs


@pytest.mark.parametrize("n,es", [(8, 0), (6, 3), (16, 1), (32, 2)], ids=ids([(8, 0), (6, 3), (16, 1), (32, 2)]))
def test_round_strided_and_shapes(n, es):
    f = Posit(n, es)
    base = torch.randn(6, 7, 8, dtype=torch.float64) * 2.0 ** torch.randint(-20, 20, (6, 7, 8))
    base[0, 0, :4] = torch.tensor([0.0, NAN, math.inf, 1e300])
    before = base.clone()
    views = [base, base.transpose(0, 2), base[::2, 1:, ::3], base.permute(2, 0, 1)[:, 1:5],
             base[:, 3], base[1, 2, 3], base[:0], base.unsqueeze(1).expand(6, 4, 7, 8),
             base.reshape(-1)[::7], torch.as_strided(base, (5, 5), (3, 2))]
    expected_base = f64([ref_round_float(v, n, es) for v in base.reshape(-1).tolist()]).reshape(base.shape)
    assert_values_equal(f.round(base), expected_base, f, base, what="round")
    for v in views:
        got = f.round(v)
        assert got.shape == v.shape
        assert_values_equal(got, f.round(v.contiguous()).double(), f, v, what=f"round(view {tuple(v.stride())})")
        assert_values_equal(f.round(v.float()), f.round(v.float().contiguous()).double(), f, what="round(f32 view)")
    assert torch.equal(base.nan_to_num(7.0), before.nan_to_num(7.0)), "round modified its input"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,es", [(8, 0), (8, 2), (16, 1), (32, 2)], ids=ids([(8, 0), (8, 2), (16, 1), (32, 2)]))
def test_round_low_precision_inputs(n, es, dtype):
    f = Posit(n, es)
    x = (torch.randn(3000, dtype=torch.float64) * 2.0 ** torch.randint(-30, 30, (3000,))).to(dtype)
    x[:6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, NAN, 6e-8]).to(dtype)
    expected = f64([ref_round_float(v, n, es) for v in x.double().tolist()])
    assert_values_equal(f.round(x), expected, f, x, what=f"round({dtype})")
    assert_values_equal(f.round(x[::3]), expected[::3], f, x[::3], what=f"round({dtype} strided)")


# --------------------------------------------------------------- exhaustive arithmetic


def ref_binary_pattern(t: Table, op, pa, pb):
    ua, ub = t.units[pa], t.units[pb]
    if ua is None or ub is None:
        return nar_pattern(t.n)
    if op == "add":
        return t.round_ratio(ua + ub, 1 << t.S)
    if op == "sub":
        return t.round_ratio(ua - ub, 1 << t.S)
    if op == "mul":
        return t.round_ratio(ua * ub, 1 << 2 * t.S)
    if ub == 0:
        return nar_pattern(t.n)
    return t.round_ratio(ua, ub)


def pattern_values(n, es):
    """float64 tensor indexed by unsigned pattern (NaN for NaR)."""
    return f64([ref_float(p, n, es) for p in range(1 << n)])


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("n,es", EXHAUSTIVE_ARITH, ids=ids(EXHAUSTIVE_ARITH))
def test_binary_exhaustive(n, es, op):
    f, t = Posit(n, es), table(n, es)
    vals = pattern_values(n, es)
    pats = range(1 << n)
    expected = vals[torch.tensor([[ref_binary_pattern(t, op, a, b) for b in pats] for a in pats])]
    a, b = vals[:, None].to(f.dtype), vals[None, :].to(f.dtype)
    assert_values_equal(getattr(f, op)(a, b), expected, f, a, b, what=op)


def ref_sqrt_small(t: Table, p):
    u = t.units[p]
    if u is None or u < 0:
        return nar_pattern(t.n)
    return t.round_sqrt_units(u)


SQRT_FORMATS = SMALL_FORMATS + [(12, 2), (16, 1)]


@pytest.mark.parametrize("n,es", SQRT_FORMATS, ids=ids(SQRT_FORMATS))
def test_sqrt_neg_abs_exhaustive(n, es):
    f, t = Posit(n, es), table(n, es) if n <= 12 else Table(n, es)
    vals = pattern_values(n, es)
    a = vals.to(f.dtype)
    expected = vals[torch.tensor([ref_sqrt_small(t, p) for p in range(1 << n)])]
    assert_values_equal(f.sqrt(a), expected, f, a, what="sqrt")
    assert_values_equal(f.neg(a), -vals, f, a, what="neg")
    assert_values_equal(f.abs(a), vals.abs(), f, a, what="abs")


@pytest.mark.parametrize("n,es", EXHAUSTIVE_ARITH, ids=ids(EXHAUSTIVE_ARITH))
def test_fma_small(n, es):
    f, t = Posit(n, es), table(n, es)
    vals = pattern_values(n, es)
    N = 1 << n
    if N**3 <= 20000:
        trip = torch.cartesian_prod(*[torch.arange(N)] * 3)
    else:
        trip = torch.randint(0, N, (20000, 3))
    exp = []
    for pa, pb, pc in trip.tolist():
        ua, ub, uc = t.units[pa], t.units[pb], t.units[pc]
        exp.append(nar_pattern(n) if None in (ua, ub, uc) else t.round_ratio(ua * ub + (uc << t.S), 1 << 2 * t.S))
    a, b, c = (vals[trip[:, i]].to(f.dtype) for i in range(3))
    assert_values_equal(f.fma(a, b, c), vals[torch.tensor(exp)], f, a, b, c, what="fma")


# ------------------------------------------------ large formats: random and near-tie cases


def ref_op_pattern(op, n, es, operands):
    vals = [decode_pattern(p, n, es) for p in operands]
    if any(v is None for v in vals):
        return nar_pattern(n)
    if op == "add":
        return ref_round_pattern(vals[0] + vals[1], n, es)
    if op == "sub":
        return ref_round_pattern(vals[0] - vals[1], n, es)
    if op == "mul":
        return ref_round_pattern(vals[0] * vals[1], n, es)
    if op == "div":
        return nar_pattern(n) if vals[1] == 0 else ref_round_pattern(vals[0] / vals[1], n, es)
    if op == "fma":
        return ref_round_pattern(vals[0] * vals[1] + vals[2], n, es)
    if op == "sqrt":
        return nar_pattern(n) if vals[0] < 0 else round_sqrt_pattern(vals[0], n, es)
    raise AssertionError(op)


def as_pattern(v: Fraction, n, es):
    """The pattern of v if v is exactly a posit of (n, es), else None."""
    p = ref_round_pattern(v, n, es)
    return p if decode_pattern(p, n, es) == v else None


def structured_cases(op, n, es):
    """Hand-made double-rounding traps near 1: the exact result is a midpoint -/+ a tiny
    amount that a float64 evaluation loses for n = 32 (F = fraction bits near 1)."""
    F = n - 3 - es
    if F < 2:
        return []
    one, q = Fraction(1), Fraction(1, 2**F)
    raw = []
    for j in (0, 1, -1, 3):
        s = Fraction(2) ** j
        if op in ("mul", "fma"):
            for t in range(1, 7):       # (1 - q/2)(1 + t q) = 1 + (t - 1/2) q - t q^2/2
                raw.append([(one - q / 2) * s, (one + t * q) / s] + ([] if op == "mul" else [Fraction(0)]))
                if op == "fma":         # shift the product onto / past the tie with c
                    for k in (1, 2, 3):
                        raw.append([(one - q / 2) * s, (one + t * q) / s, k * t * q * q / 2])
                        raw.append([(one - q / 2) * s, (one + t * q) / s, -one - k * q])
        elif op == "div":
            for t in range(0, 7):       # (1 + t q) / (1 - q/2) = 1 + (t + 1/2) q + tiny
                raw.append([(one + t * q) * s, (one - q / 2)])
                raw.append([(one - q / 2) * s, (one + t * q)])
        elif op == "sqrt":
            for t in range(0, 7):       # sqrt(1 + (2t+1) q) = 1 + (t + 1/2) q - tiny
                raw.append([(one + (2 * t + 1) * q) * s * s])
        elif op in ("add", "sub"):
            for t in range(0, 7):       # (1 + t q) + (q/2 and its neighbours)
                for ph in patterns_near(q / 2, n, es):
                    h = decode_pattern(ph, n, es)
                    raw.append([(one + t * q) * s, (h if op == "add" else -h) * s])
    cases = []
    for vals in raw:
        for sign in (1, -1):
            pats = [as_pattern(sign * v if i == 0 else v, n, es) for i, v in enumerate(vals)]
            if None not in pats:
                cases.append(pats)
    return cases


def near_tie_cases(op, n, es, count, rng):
    """Operands whose exact result lies at or next to an (n+1)-bit midpoint."""
    cases = []
    precise = [p for p in random_patterns(n, 4 * count, rng) if p != nar_pattern(n) and p != 0]
    for i in range(count):
        pa, pr = precise[2 * i], precise[2 * i + 1]
        a = decode_pattern(pa, n, es)
        r = signed(pa, n) + rng.randint(-3, 3)
        if not -top(n) <= r < top(n):
            continue
        m = boundary(r, n, es)                           # a midpoint near a
        if op in ("add", "sub"):
            for pb in patterns_near(m - a, n, es):
                cases.append([pa, pb] if op == "add" else [pa, (-pb) & mask(n)])
        elif op == "mul":
            for pb in patterns_near(m / a, n, es):
                cases.append([pa, pb])
        elif op == "div":
            b = decode_pattern(pr, n, es)
            for px in patterns_near(m * b, n, es):
                cases.append([px, pr])
        elif op == "fma":
            b = decode_pattern(pr, n, es)
            s = signed(ref_round_pattern(a * b, n, es), n) + rng.randint(-2, 2)
            if -top(n) <= s < top(n):
                for pc in patterns_near(boundary(s, n, es) - a * b, n, es):
                    cases.append([pa, pr, pc])
            # c = -round(a*b): the result is the product's rounding error, exactly
            cases.append([pa, pr, (-ref_round_pattern(a * b, n, es)) & mask(n)])
        elif op == "sqrt":
            if m > 0:
                for px in patterns_near(m * m, n, es):
                    cases.append([px])
    return cases


ARITY = {"add": 2, "sub": 2, "mul": 2, "div": 2, "fma": 3, "sqrt": 1}


def check_large_op(op, n, es, count, seed):
    f, rng = Posit(n, es), random.Random(seed)
    k = ARITY[op]
    cases = structured_cases(op, n, es) + near_tie_cases(op, n, es, count // 4, rng)
    pats = random_patterns(n, count * k, rng)
    cases += [pats[i * k:(i + 1) * k] for i in range(count)]
    cases += [[0] * k, [nar_pattern(n)] * k, [1] * k, [top(n)] * k, [mask(n)] * k]
    expected = f64([ref_float(ref_op_pattern(op, n, es, c), n, es) for c in cases])
    args = [f64([ref_float(c[i], n, es) for c in cases]).to(f.dtype) for i in range(k)]
    assert_values_equal(getattr(f, op)(*args), expected, f, *args, what=op)


@pytest.mark.parametrize("op", list(ARITY))
@pytest.mark.parametrize("n,es", LARGE_ARITH, ids=ids(LARGE_ARITH))
def test_large_formats_random_and_near_ties(n, es, op):
    check_large_op(op, n, es, 600, seed=n * 1000 + es * 10 + list(ARITY).index(op))


@pytest.mark.slow
@pytest.mark.parametrize("op", list(ARITY))
@pytest.mark.parametrize("n,es", LARGE_ARITH + [(32, 5), (24, 1), (20, 2)], ids=ids(LARGE_ARITH + [(32, 5), (24, 1), (20, 2)]))
def test_large_formats_random_and_near_ties_slow(n, es, op):
    check_large_op(op, n, es, 20000, seed=7 + n * 1000 + es * 10 + list(ARITY).index(op))


ALL_MID = [(n, es) for n in range(9, 33) for es in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("n,es", ALL_MID, ids=ids(ALL_MID))
def test_all_formats_ops_slow(n, es):
    for i, op in enumerate(ARITY):
        check_large_op(op, n, es, 1000, seed=3 + n * 1000 + es * 10 + i)


def test_structured_cases_are_double_rounding_traps():
    """Test-strength check: for posit(32,2) some structured cases really defeat a float64
    evaluation followed by one rounding (otherwise they would prove nothing)."""
    n, es = 32, 2
    for op, fn in [("mul", lambda a, b: a * b),
                   ("div", lambda a, b: a / b), ("sqrt", lambda a: math.sqrt(abs(a)))]:
        traps = 0
        for c in structured_cases(op, n, es):
            vals = [float(decode_pattern(p, n, es)) for p in c]
            if op == "sqrt" and vals[0] < 0:
                continue
            naive = ref_round_pattern(Fraction(fn(*vals)), n, es)
            traps += naive != ref_op_pattern(op, n, es, c)
        assert traps > 0, op


# --------------------------------------------------------------- special cases


SPECIAL_FORMATS = [(8, 0), (16, 1), (32, 2), (32, 5), (27, 4), (10, 5), (3, 1)]


@pytest.mark.parametrize("n,es", SPECIAL_FORMATS, ids=ids(SPECIAL_FORMATS))
def test_nar_propagation_and_domain_errors(n, es):
    f = Posit(n, es)
    vals = f64([0.0, 1.0, -1.0, f.minpos, -f.maxpos]).to(f.dtype)
    nar = torch.full_like(vals, NAN)
    for op in ("add", "sub", "mul", "div"):
        assert getattr(f, op)(vals, nar).isnan().all(), op
        assert getattr(f, op)(nar, vals).isnan().all(), op
    for args in ((nar, vals, vals), (vals, nar, vals), (vals, vals, nar)):
        assert f.fma(*args).isnan().all()
    for op in ("sqrt", "neg", "abs", "exp", "log", "sigmoid", "tanh"):
        assert getattr(f, op)(nar).isnan().all(), op
    zero = torch.zeros_like(vals)
    assert f.div(vals, zero).isnan().all(), "x / 0 must be NaR (0/0 included)"
    neg = f64([-1.0, -f.minpos, -f.maxpos, -4.0]).to(f.dtype)
    assert f.sqrt(neg).isnan().all(), "sqrt(negative) must be NaR"
    assert f.log(neg).isnan().all(), "log(negative) must be NaR"


@pytest.mark.parametrize("n,es", SPECIAL_FORMATS, ids=ids(SPECIAL_FORMATS))
def test_saturation_and_exact_zero(n, es):
    f = Posit(n, es)
    mx, mn = f.maxpos, f.minpos

    def t(*v):
        return f64(list(v)).to(f.dtype)

    def same(got, *exp):
        assert_values_equal(got, f64(list(exp)), f, what="saturation")

    same(f.mul(t(mx, -mx, mx), t(mx, mx, -mx)), mx, -mx, -mx)
    same(f.mul(t(mn, -mn, mn), t(mn, mn, -mn)), mn, -mn, -mn)
    same(f.div(t(mx, mn, -mx), t(mn, mx, mn)), mx, mn, -mx)
    same(f.add(t(mx, -mx), t(mx, -mx)), mx, -mx)
    same(f.sub(t(mx, -mx), t(-mx, mx)), mx, -mx)
    same(f.fma(t(mx, mn, mx), t(mx, mn, mx), t(0.0, 0.0, -mx)), mx, mn, mx)
    # an exact zero result is zero, not minpos
    same(f.sub(t(1.0, mx, mn), t(1.0, mx, mn)), 0.0, 0.0, 0.0)
    same(f.add(t(1.0, -mn), t(-1.0, mn)), 0.0, 0.0)
    same(f.mul(t(0.0, 0.0), t(mx, -mn)), 0.0, 0.0)
    same(f.fma(t(1.0, mx), t(1.0, 0.0), t(-1.0, 0.0)), 0.0, 0.0)
    same(f.sqrt(t(0.0)), 0.0)


def test_posit32_5_extremes_outside_float64_products():
    """maxpos*maxpos (2^1920) and minpos*minpos (2^-1920) leave the float64 range."""
    n, es = 32, 5
    f = Posit(n, es)
    assert f.maxpos == 2.0**960
    assert_values_equal(f.mul(f64([f.maxpos, f.minpos]), f64([f.maxpos, f.minpos])),
                        f64([f.maxpos, f.minpos]), f, what="mul")       # hand-checked
    special = [1, 2, top(n), top(n) - 1, mask(n), (-top(n)) & mask(n), 1 << (n - 2)]
    for op in ("add", "sub", "mul", "div", "fma"):
        k = ARITY[op]
        cases = [list(c) for c in itertools.product(special, repeat=k)]
        args = [f64([ref_float(c[i], n, es) for c in cases]) for i in range(k)]
        expected = f64([ref_float(ref_op_pattern(op, n, es, c), n, es) for c in cases])
        assert_values_equal(getattr(f, op)(*args), expected, f, *args, what=op)


def test_broadcasting():
    f = Posit(16, 1)
    a = f.round(torch.randn(5, 1, 3, dtype=torch.float64))
    b = f.round(torch.randn(4, 1, dtype=torch.float64))
    c = f.round(torch.randn(3, dtype=torch.float64))
    for op, args in [("add", (a, b)), ("sub", (a, b)), ("mul", (a, b)), ("div", (a, b)), ("fma", (a, b, c))]:
        got = getattr(f, op)(*args)
        assert got.shape == (5, 4, 3), op
        full = [x.expand(5, 4, 3).contiguous() for x in args]
        assert_values_equal(got, getattr(f, op)(*full).double(), f, *full, what=op)
    # non-contiguous operands and 0-dim operands
    x = f.round(torch.randn(6, 8, dtype=torch.float64) * 100)
    y = f.round(torch.randn(8, 6, dtype=torch.float64))
    s = f.round(torch.tensor(3.0, dtype=torch.float64))
    for op in ("add", "sub", "mul", "div"):
        got = getattr(f, op)(x[::2], y.t()[1::2])
        assert_values_equal(got, getattr(f, op)(x[::2].contiguous(), y.t()[1::2].contiguous()).double(), f, what=op)
        got = getattr(f, op)(s, x)
        assert got.shape == x.shape
        assert_values_equal(got, getattr(f, op)(s.expand_as(x).contiguous(), x).double(), f, what=op)
    assert f.sqrt(s).shape == () and f.sqrt(s).item() == f.round(torch.tensor(3.0**0.5, dtype=torch.float64)).item()


# --------------------------------------------------------------- faithful functions


def bracket(x: Fraction, n, es):
    """(largest posit <= x, smallest posit >= x) for minpos <= |x| <= maxpos or x = 0."""
    p = signed(ref_round_pattern(x, n, es), n)
    v = decode_pattern(p & mask(n), n, es)
    if v == x:
        return v, v
    if v < x:
        return v, decode_pattern((p + 1) & mask(n), n, es)
    return decode_pattern((p - 1) & mask(n), n, es), v


def faithful_interval(y: float, n, es):
    """Posits a faithful evaluation of a function with float64 value y may return."""
    if y == 0:
        return Fraction(0), Fraction(0)
    mn, mx = decode_pattern(1, n, es), decode_pattern(top(n), n, es)
    ends = []
    for z in sorted((Fraction(y) * (1 - Fraction(1, 10**12)), Fraction(y) * (1 + Fraction(1, 10**12)))):
        mag = min(max(abs(z), mn), mx)                    # saturation, never 0
        ends.append(mag if z > 0 else -mag)
    return bracket(ends[0], n, es)[0], bracket(ends[1], n, es)[1]


FAITHFUL_FORMATS = [(8, 0), (8, 2), (12, 3), (16, 1), (32, 2), (32, 5)]


@pytest.mark.parametrize("fn", ["exp", "log", "sigmoid", "tanh"])
@pytest.mark.parametrize("n,es", FAITHFUL_FORMATS, ids=ids(FAITHFUL_FORMATS))
def test_faithful_functions(n, es, fn):
    f = Posit(n, es)
    pats = range(1 << n) if n <= 12 else random_patterns(n, 800, random.Random(n + es))
    xs = [decode_pattern(p, n, es) for p in pats]
    ok = {"exp": lambda x: abs(x) <= 700, "log": lambda x: x > 0,
          "sigmoid": lambda x: abs(x) <= 700, "tanh": lambda x: True}[fn]
    xs = [x for x in xs if x is not None and ok(x)]
    math_fn = {"exp": math.exp, "log": math.log, "sigmoid": lambda x: 1 / (1 + math.exp(-x)),
               "tanh": math.tanh}[fn]
    a = f64([float(x) for x in xs]).to(f.dtype)
    got = getattr(f, fn)(a).double().tolist()
    for x, g in zip(xs, got):
        lo, hi = faithful_interval(math_fn(float(x)), n, es)
        assert not math.isnan(g) and lo <= Fraction(g) <= hi, f"{f} {fn}({float(x)!r}) = {g!r}, expected in [{float(lo)!r}, {float(hi)!r}]"
        assert as_pattern(Fraction(g), n, es) is not None, f"{fn}({float(x)}) = {g!r} is not a posit"


def test_log_of_zero_is_nar():
    """log is evaluated in float64 then rounded: log(0) = -inf -> NaR."""
    f = Posit(16, 1)
    assert f.log(f64([0.0]).to(f.dtype)).isnan().all()


# --------------------------------------------------------------- stochastic rounding


STOCH_FORMATS = [(8, 0), (8, 2), (16, 1), (32, 2)]


@pytest.mark.parametrize("n,es", STOCH_FORMATS, ids=ids(STOCH_FORMATS))
def test_stochastic_frequencies(n, es):
    f = Posit(n, es)
    N = 200_000
    cases = []
    # neighbour pairs: near 1, near maxpos (geometric gaps for es > 0), near minpos, negative
    for p in (1 << (n - 2), top(n) - 1, 1, (-(1 << (n - 2)) - 3) & mask(n)):
        lo, hi = decode_pattern(p, n, es), decode_pattern((p + 1) & mask(n), n, es)
        for frac in (Fraction(1, 10), Fraction(1, 2), Fraction(3, 4)):
            x = lo + frac * (hi - lo)
            if Fraction(float(x)) == x:
                cases.append((lo, hi, x))
    g = torch.Generator().manual_seed(1234)
    for lo, hi, x in cases:
        out = f.round(torch.full((N,), float(x), dtype=torch.float64), "stochastic", generator=g)
        assert out.dtype == f.dtype
        out = out.double()
        assert ((out == float(lo)) | (out == float(hi))).all(), (x, out.unique())
        p_hi = float((x - lo) / (hi - lo))
        k = int((out == float(hi)).sum())
        sigma = math.sqrt(N * p_hi * (1 - p_hi))
        assert abs(k - N * p_hi) <= 6 * sigma + 1, f"{f} x={float(x)!r} in [{float(lo)}, {float(hi)}]: {k}/{N} up, expected p={p_hi}"


@pytest.mark.parametrize("n,es", STOCH_FORMATS + [(27, 4), (5, 1)], ids=ids(STOCH_FORMATS + [(27, 4), (5, 1)]))
def test_stochastic_neighbours_exact_and_seeded(n, es):
    f = Posit(n, es)
    rng = random.Random(n * 31 + es)
    span = (n - 2) * 2**es
    xs = [rng.choice((-1, 1)) * (1 + rng.random()) * 2.0 ** rng.uniform(-span, span - 1) for _ in range(3000)]
    x = f64(xs)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r1 = f.round(x, "stochastic", generator=g1)
    r2 = f.round(x, "stochastic", generator=g2)
    assert r1.dtype == f.dtype and torch.equal(r1, r2), "same seed must give the same result"
    for v, got in zip(xs, r1.double().tolist()):
        lo, hi = bracket(Fraction(v), n, es)
        assert Fraction(got) in (lo, hi), f"{f} stochastic round({v!r}) = {got!r}, not in {{{float(lo)!r}, {float(hi)!r}}}"
    # different seeds give different draws (half-way points: 3000 fair coins)
    vals = pattern_values(min(n, 12), es) if n <= 12 else None
    mid = f64([float(boundary(signed(p, n), n, es)) for p in random_patterns(n - 1, 3000, rng) if 0 < p < top(n)])
    a = f.round(mid, "stochastic", generator=torch.Generator().manual_seed(1))
    b = f.round(mid, "stochastic", generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    # exact posits are unchanged
    exact = f.round(x)
    assert torch.equal(f.round(exact, "stochastic", generator=g1), exact)
    if vals is not None:
        v = vals[~vals.isnan()].to(f.dtype)
        assert torch.equal(f.round(v, "stochastic"), v)


# --------------------------------------------------------------- errors


def test_encode_rejects_non_posits_and_round_true():
    cases = [((8, 0), [0.3]), ((8, 0), [1.0, 100.0]), ((8, 0), [1.0 + 2**-7]), ((16, 1), [1.0 + 2**-20]),
             ((32, 2), [1.0 + 2**-40]), ((32, 2), [2.0**-130]), ((5, 0), [0.3, 0.5])]
    for (n, es), xs in cases:
        f = Posit(n, es)
        x = f64(xs)
        with pytest.raises(ValueError):
            f.encode(x)
        got = f.encode(x, round=True)
        exp = torch.tensor([signed(round_pattern(Fraction(v), n, es), n) for v in xs], dtype=f.storage_dtype)
        assert torch.equal(got, exp), (n, es, got, exp)


def test_encode_round_true_random():
    for n, es in [(8, 1), (16, 1), (32, 2), (27, 4)]:
        f, rng = Posit(n, es), random.Random(n)
        span = (n - 2) * 2**es + 4
        xs = [rng.choice((-1, 1)) * (1 + rng.random()) * 2.0 ** rng.uniform(-span, span) for _ in range(500)]
        got = f.encode(f64(xs), round=True)
        exp = torch.tensor([signed(ref_round_pattern(Fraction(v), n, es), n) for v in xs], dtype=f.storage_dtype)
        assert torch.equal(got, exp), (n, es)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_round_rejects_non_floating(dtype):
    with pytest.raises(TypeError):
        Posit(8, 2).round(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("mode", ["up", "nearest_even", "NEAREST", "", "truncate"])
def test_round_rejects_unknown_mode(mode):
    with pytest.raises(ValueError):
        Posit(8, 2).round(torch.ones(3), mode)


# --------------------------------------------------------------- hypothesis properties


formats = st.tuples(st.integers(2, 32), st.integers(0, 5))
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=100, deadline=None)
@given(formats, st.lists(finite, min_size=1, max_size=12), st.booleans())
def test_prop_round_matches_reference_and_idempotent(fmt, xs, underflow):
    f = Posit(*fmt)
    x = f64(xs)
    r = f.round(x, underflow=underflow)
    expected = f64([float(decode_pattern(round_pattern(Fraction(v), *fmt, underflow), *fmt)) for v in xs])
    assert_values_equal(r, expected, f, x, what=f"round[underflow={underflow}]")
    assert torch.equal(f.round(r, underflow=underflow), r)
    assert torch.equal(f.round(r.double()), r)


@settings(max_examples=100, deadline=None)
@given(formats, st.lists(finite, min_size=2, max_size=30))
def test_prop_round_monotonic_and_odd(fmt, xs):
    f = Posit(*fmt)
    x = f64(sorted(xs))
    r = f.round(x).double()
    assert (r[1:] >= r[:-1]).all(), (x, r)
    assert torch.equal(f.round(-x).double(), -r)


@settings(max_examples=100, deadline=None)
@given(formats, st.data())
def test_prop_decode_encode_roundtrip(fmt, data):
    n, es = fmt
    f = Posit(n, es)
    pats = data.draw(st.lists(st.integers(0, mask(n)), min_size=1, max_size=20))
    bits = torch.tensor([signed(p, n) for p in pats], dtype=f.storage_dtype)
    v = f.decode(bits)
    assert_values_equal(v, f64([ref_float(p, n, es) for p in pats]), f, bits, what="decode")
    assert torch.equal(f.encode(v), bits)
    assert_values_equal(f.decode(f.encode(v)), v.double(), f, what="decode(encode)")


@pytest.mark.parametrize("fmt", [Posit(8, 2), Posit(16, 1), Posit(32, 2)])
def test_exp_and_sigmoid_never_round_a_positive_result_to_zero(fmt):
    x = torch.tensor([-1000.0, -800.0], dtype=torch.float64)
    assert torch.all(fmt.exp(x).double() == fmt.minpos)
    assert torch.all(fmt.sigmoid(x).double() == fmt.minpos)
    assert torch.isnan(fmt.exp(torch.tensor([float("-inf"), float("nan")]))).all()
