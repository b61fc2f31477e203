"""Exact reference for binary float formats on ``fractions.Fraction``, from the definition.

A format is (e, m, subnormals, fn, overflow): e exponent bits, m mantissa bits, bias
2^(e-1) - 1. A pattern is sign | exponent field E | mantissa M. E = 0: subnormal
M * 2^(1 - bias - m) (zero when subnormals are off); the top field: IEEE inf (M = 0) or
NaN, or, for fn formats, NaN only when M is all ones and a normal value otherwise;
otherwise (1 + M / 2^m) * 2^(E - bias).

Rounding: the nearest value, ties to the even mantissa, over the format's values extended
upward with the same precision (an unbounded exponent); a result above max overflows to
inf, max (saturate) or NaN. Without subnormals the values below min normal are 0 only,
and the midpoint min_normal / 2 goes to 0. Exact zeros keep IEEE's signs.

Results are Python floats (every value of a tested format is a float64). Nothing here is
taken from the library under test.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Spec:
    e: int
    m: int
    subnormals: bool = True
    fn: bool = False
    overflow: str = "inf"

    @property
    def bias(self) -> int:
        return 2 ** (self.e - 1) - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def nbits(self) -> int:
        return 1 + self.e + self.m

    @property
    def max(self) -> Fraction:
        top = 2**self.e - 1 if self.fn else 2**self.e - 2      # largest field with finite values
        mant = 2**self.m - 2 if self.fn else 2**self.m - 1
        return (1 + Fraction(mant, 2**self.m)) * Fraction(2) ** (top - self.bias)


def decode(p: int, s: Spec) -> float:
    p &= (1 << s.nbits) - 1
    sign = -1.0 if p >> (s.e + s.m) else 1.0
    field = (p >> s.m) & (2**s.e - 1)
    mant = p & (2**s.m - 1)
    if field == 2**s.e - 1 and (not s.fn or mant == 2**s.m - 1):
        return NAN if (mant or s.fn) else sign * INF
    if field == 0:
        v = Fraction(mant * s.subnormals) * Fraction(2) ** (s.emin - s.m)
    else:
        v = (1 + Fraction(mant, 2**s.m)) * Fraction(2) ** (field - s.bias)
    return math.copysign(float(v), sign)


def _floor_log2(t: Fraction) -> int:
    """floor(log2 t) for t > 0."""
    k = t.numerator.bit_length() - t.denominator.bit_length()
    return k if Fraction(2) ** k <= t else k - 1


def round_magnitude(t: Fraction, s: Spec, sticky: int = 0) -> Fraction:
    """Nearest value to t >= 0 in the unbounded-above format (no overflow rule yet).
    ``sticky`` = +-1 says the real value is t plus (minus) an infinitesimal."""
    if t == 0 and sticky <= 0:
        return Fraction(0)
    if t < Fraction(2) ** s.emin and not s.subnormals:
        half = Fraction(2) ** (s.emin - 1)
        return Fraction(0) if (t < half or (t == half and sticky <= 0)) else Fraction(2) ** s.emin
    q = Fraction(2) ** (max(_floor_log2(t) if t else s.emin, s.emin) - s.m)
    k = math.floor(t / q)
    r = t / q - k
    up = r > Fraction(1, 2) or (r == Fraction(1, 2) and (sticky > 0 or (sticky == 0 and k % 2 == 1)))
    return (k + up) * q


def finish(v: Fraction, negative: bool, s: Spec) -> float:
    """Apply the overflow rule and the sign to a rounded magnitude."""
    if v > s.max:
        over = {"inf": INF, "saturate": float(s.max), "nan": NAN}[s.overflow]
        return -over if negative else over
    return -float(v) if negative else float(v)


def round_exact(x: Fraction, s: Spec, negative_zero: bool = False, sticky: int = 0) -> float:
    """The format value nearest to the real x (+ sticky infinitesimal); x == 0 gives a
    zero signed by ``negative_zero``."""
    if x == 0 and sticky == 0:
        return -0.0 if negative_zero else 0.0
    neg = x < 0 or (x == 0 and sticky < 0)
    return finish(round_magnitude(abs(x), s, -sticky if neg else sticky), neg, s)


def round_special(x: float, s: Spec) -> float:
    """Round a non-finite float64: NaN stays, an infinity stays or follows the overflow
    rule in formats without one."""
    if math.isnan(x):
        return NAN
    if not s.fn:
        return x
    over = {"saturate": float(s.max), "nan": NAN}[s.overflow]
    return math.copysign(over, x)


def round_float(x: float, s: Spec) -> float:
    if not math.isfinite(x):
        return round_special(x, s)
    return round_exact(Fraction(x), s, math.copysign(1.0, x) < 0)


def _sign(x: float) -> bool:
    return math.copysign(1.0, x) < 0


def op(name: str, s: Spec, *args: float) -> float:
    """Correctly rounded result of add, sub, mul, div, sqrt or fma on float64 operands,
    with IEEE 754's exceptional cases and signs of zero."""
    if name == "sub":
        return op("add", s, args[0], -args[1])
    if not all(math.isfinite(a) for a in args):
        return round_special(_special(name, *args), s)
    F = [Fraction(a) for a in args]
    if name == "add":
        exact = F[0] + F[1]
        zero_neg = _sign(args[0]) and _sign(args[1])
    elif name == "mul":
        exact = F[0] * F[1]
        zero_neg = _sign(args[0]) != _sign(args[1])
    elif name == "div":
        if F[1] == 0:
            return round_special(NAN if F[0] == 0 else (-INF if _sign(args[0]) != _sign(args[1]) else INF), s)
        exact = F[0] / F[1]
        zero_neg = _sign(args[0]) != _sign(args[1])
    elif name == "fma":
        prod = F[0] * F[1]
        exact = prod + F[2]
        zero_neg = prod == 0 and (_sign(args[0]) != _sign(args[1])) and _sign(args[2])
    elif name == "sqrt":
        return _sqrt(F[0], args[0], s)
    else:
        raise ValueError(name)
    return round_exact(exact, s, zero_neg)


def _sqrt(x: Fraction, xf: float, s: Spec) -> float:
    if x < 0:
        return NAN
    if x == 0:
        return xf                                   # sqrt(-0) = -0
    K = 1200                                        # 2^-K is far below every boundary
    arg = x * Fraction(2) ** (2 * K)                # an integer: x is a float64
    assert arg.denominator == 1
    r = math.isqrt(arg.numerator)
    return round_exact(Fraction(r, 2**K), s, sticky=0 if r * r == arg.numerator else 1)


def _special(name: str, *args: float) -> float:
    """IEEE's result when an operand is inf or NaN (Python floats raise on x / 0)."""
    if any(math.isnan(a) for a in args):
        return NAN
    a = args
    if name == "add":
        return a[0] + a[1]
    if name == "mul":
        return a[0] * a[1]
    if name == "div":
        if math.isinf(a[0]):
            return NAN if math.isinf(a[1]) else math.copysign(INF, a[0]) * math.copysign(1.0, a[1])
        return math.copysign(0.0, a[0]) * math.copysign(1.0, a[1])
    if name == "sqrt":
        return a[0] if a[0] > 0 else NAN
    if name == "fma":
        return a[0] * a[1] + a[2]
    raise ValueError(name)


@functools.lru_cache(maxsize=None)
def all_values(s: Spec) -> tuple[float, ...]:
    """Every finite value, sorted, without duplicate zeros (small formats only)."""
    vals = {decode(p, s) for p in range(1 << s.nbits)}
    return tuple(sorted(v for v in vals if math.isfinite(v)))


def round_by_search(x: Fraction, s: Spec) -> float:
    """Definitional check of ``round_exact``: the nearest of all values (by enumeration,
    plus max's successor for the overflow rule), ties to the even pattern."""
    vals = [Fraction(v) for v in all_values(s) if v >= 0]
    mx = Fraction(s.max)
    vals.append(mx + Fraction(2) ** (_floor_log2(mx) - s.m))   # first value past max
    t = abs(x)
    best = min(vals, key=lambda v: (abs(v - t), _pattern_parity(v, s)))
    return finish(best, x < 0, s)


def _pattern_parity(v: Fraction, s: Spec) -> int:
    """Low mantissa bit of v's pattern (0 is even; past max: one more than max's)."""
    if v == 0:
        return 0
    if v > s.max:
        return 1 - _pattern_parity(s.max, s)
    q = Fraction(2) ** (max(_floor_log2(v), s.emin) - s.m)
    return int(v / q) % 2
