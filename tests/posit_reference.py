"""Exact posit reference built on ``fractions.Fraction``, written from the definition.

posit(n, es): sign, regime (run of identical bits, r ones -> k = r-1, r zeros -> k = -r,
ended by the opposite bit or the end of the word), es exponent bits (bits cut off by the
end of the word count as 0), then the fraction with a hidden 1.  Value =
(-1)^s * useed^k * 2^e * 1.f with useed = 2^(2^es); negatives are the two's complement of
the whole pattern; 0...0 is zero and 10...0 is NaR.

Rounding: exact posits stay; |x| >= maxpos -> maxpos, 0 < |x| <= minpos -> minpos; else
round to nearest where the boundary between neighbouring n-bit patterns p, p+1 is the
value of the (n+1)-bit pattern 2p+1 (same es), ties to the even pattern.

Nothing here is taken from the library under test.
"""
from __future__ import annotations

import bisect
import functools
import math
from fractions import Fraction

__all__ = [
    "decode_pattern", "all_values", "round_pattern", "round_sqrt_pattern", "round_exact", "Table",
    "minpos", "maxpos", "nar_pattern", "fields", "significand_bits", "fam_universal",
]


def nar_pattern(n: int) -> int:
    return 1 << (n - 1)


def fields(p: int, n: int, es: int) -> tuple[int, int, int, str]:
    """(sign, k, e, fraction bits) of a pattern that is neither 0 nor NaR."""
    p &= (1 << n) - 1
    negative = p >> (n - 1)
    if negative:
        p = (1 << n) - p                       # two's complement of the whole word
    body = format(p, f"0{n}b")[1:]             # the n-1 bits after the sign bit
    run = len(body) - len(body.lstrip(body[0]))
    k = run - 1 if body[0] == "1" else -run
    rest = body[run + 1:]                      # skip the regime's terminating bit
    e = int(rest[:es].ljust(es, "0") or "0", 2)
    return negative, k, e, rest[es:]


@functools.lru_cache(maxsize=1 << 18)
def decode_pattern(p: int, n: int, es: int) -> Fraction | None:
    """Value of the n-bit pattern ``p`` (only its low n bits are used); None for NaR."""
    p &= (1 << n) - 1
    if p == 0:
        return Fraction(0)
    if p == nar_pattern(n):
        return None
    negative, k, e, frac = fields(p, n, es)
    f = Fraction(int(frac or "0", 2), 1 << len(frac))
    v = (1 + f) * Fraction(2) ** (k * 2 ** es + e)
    return -v if negative else v


def significand_bits(p: int, n: int, es: int) -> int:
    """Significand bits of a nonzero, non-NaR pattern, hidden bit included."""
    return 1 + len(fields(p, n, es)[3])


def minpos(n: int, es: int) -> Fraction:
    return decode_pattern(1, n, es)


def maxpos(n: int, es: int) -> Fraction:
    return decode_pattern((1 << (n - 1)) - 1, n, es)


def all_values(n: int, es: int) -> list[Fraction]:
    """All real (non-NaR) values of posit(n, es), sorted ascending."""
    vals = [decode_pattern(p, n, es) for p in range(1 << n)]
    return sorted(v for v in vals if v is not None)


def _round_positive(compare, n: int, es: int, underflow: bool = False) -> int:
    """Pattern of the posit nearest to a real t > 0 known only through ``compare(v)``,
    which returns -1, 0 or 1 as t is below, equal to or above the Fraction v >= 0.

    Binary search over the positive patterns, which are ordered like their values.
    """
    top = (1 << (n - 1)) - 1                   # pattern of maxpos
    if compare(decode_pattern(top, n, es)) >= 0:
        return top
    if compare(decode_pattern(1, n, es)) <= 0:
        # minpos/useed is the (n+1)-bit minpos: the midpoint between 0 and minpos
        if underflow and compare(decode_pattern(1, n + 1, es)) <= 0:
            return 0
        return 1
    lo, hi = 1, top                            # decode(lo) < t < decode(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = compare(decode_pattern(mid, n, es))
        if c == 0:
            return mid
        if c > 0:
            lo = mid
        else:
            hi = mid
    c = compare(decode_pattern(2 * lo + 1, n + 1, es))   # boundary between lo and hi
    if c < 0 or (c == 0 and lo % 2 == 0):
        return lo
    return hi


def _cmp(a, b) -> int:
    return (a > b) - (a < b)


def round_pattern(x, n: int, es: int, underflow: bool = False) -> int:
    """Pattern (unsigned n-bit int) of the posit nearest to the real x (Fraction/int/float)."""
    x = Fraction(x)
    if x < 0:
        return (-round_pattern(-x, n, es, underflow)) & ((1 << n) - 1)
    if x == 0:
        return 0
    return _round_positive(lambda v: _cmp(x, v), n, es, underflow)


def round_sqrt_pattern(x, n: int, es: int) -> int:
    """Pattern of the posit nearest to sqrt(x) for a real x >= 0 (compares v*v with x)."""
    x = Fraction(x)
    if x == 0:
        return 0
    return _round_positive(lambda v: _cmp(x, v * v), n, es)


def round_exact(x, n: int, es: int, underflow: bool = False) -> Fraction:
    return decode_pattern(round_pattern(x, n, es, underflow), n, es)


class Table:
    """Fast path of the same rounding for small n (enumerates the 2^(n-1) positive patterns).

    Works on integers: every (n+1)-bit value is a multiple of 2^-T with T = (n-1) 2^es, so
    a real y = |x| 2^T is compared with integer boundaries.  Checked against
    ``round_pattern`` in test_format.py::test_reference_table_matches_bisection.
    """

    def __init__(self, n: int, es: int):
        self.n, self.es = n, es
        self.top = (1 << (n - 1)) - 1
        self.S = (n - 2) * 2 ** es             # minpos = 2^-S
        self.T = (n - 1) * 2 ** es             # (n+1)-bit minpos = 2^-T
        scale = Fraction(2) ** self.T
        # vals[p] for p = 0..top, mids[i] = boundary between patterns i+1 and i+2
        self.vals = [int(decode_pattern(p, n, es) * scale) for p in range(self.top + 1)]
        self.mids = [int(decode_pattern(2 * p + 1, n + 1, es) * scale)
                     for p in range(1, self.top)]
        # value of each pattern in units of minpos (an integer: every posit is k*minpos)
        self.units = [None if p == nar_pattern(n) else int(decode_pattern(p, n, es) * 2 ** self.S)
                      for p in range(1 << n)]

    def _round_pos(self, fl: int, exact: bool, underflow: bool) -> int:
        """Pattern for y = |x| * 2^T > 0 with floor(y) = fl; exact says whether y == fl."""
        if fl >= self.vals[self.top]:
            return self.top
        if fl < self.vals[1] or (exact and fl == self.vals[1]):
            if underflow and (fl == 0 or (fl == 1 and exact)):
                return 0
            return 1
        if exact:
            c = bisect.bisect_left(self.mids, fl)    # boundaries strictly below y
            if c < len(self.mids) and self.mids[c] == fl:
                p = c + 1                            # tie between p and p+1
                return p if p % 2 == 0 else p + 1
        else:
            c = bisect.bisect_right(self.mids, fl)
        return c + 1

    def _signed(self, negative: bool, p: int) -> int:
        return (-p) & ((1 << self.n) - 1) if negative else p

    def round_ratio(self, num: int, den: int, underflow: bool = False) -> int:
        """Pattern nearest to num/den (den != 0)."""
        if num == 0:
            return 0
        negative = (num < 0) != (den < 0)
        num, den = abs(num), abs(den)
        fl, rem = divmod(num << self.T, den)
        return self._signed(negative, self._round_pos(fl, rem == 0, underflow))

    def round_fraction(self, x, underflow: bool = False) -> int:
        x = Fraction(x)
        return self.round_ratio(x.numerator, x.denominator, underflow)

    def round_sqrt_units(self, u: int) -> int:
        """Pattern nearest to sqrt(u * 2^-S) for an integer u >= 0."""
        if u == 0:
            return 0
        arg = u << (2 * self.T - self.S)           # y^2 = x * 2^(2T)
        r = math.isqrt(arg)
        return self._round_pos(r, r * r == arg, False)

    def value(self, p: int):
        return decode_pattern(p, self.n, self.es)


def _universal_triple(x: Fraction, n: int, es: int, fbits: int) -> tuple[bool, int, int]:
    """(sign, scale, significand with ``fbits`` fraction bits as an integer) of a posit value
    as Universal's ``value`` holds it; zero decodes as its pattern does: a regime run of
    n - 1 zeros, scale -(n - 1) 2^es, fraction 0."""
    if x == 0:
        return False, -(n - 1) * 2 ** es, 1 << fbits
    ax, scale = abs(x), 0
    while ax >= 2:
        ax, scale = ax / 2, scale + 1
    while ax < 1:
        ax, scale = ax * 2, scale - 1
    sig = ax * 2 ** fbits
    assert sig.denominator == 1, (x, n, es)
    return x < 0, scale, int(sig)


def fam_universal(a, b, c, n: int, es: int) -> Fraction | None:
    """PositNN's ``fam_corrected(a, b, c)`` = (a + b) * c on posit(n, es) values (Fractions,
    None for NaR), modelled on Universal's bit blocks: ``module_add<fbits, fbits + 4>``
    places the larger-scale operand's hidden bit at position fbits + 3 and the other one
    ``scale difference`` places lower, copies the fraction bits that land at positions >= 1
    and ORs every bit at position <= 0 into bit 0 (``nshift``'s uncertainty bit); the
    signed sum of the two blocks is exact, the product with c is exact, and ``convert``
    rounds it once to nearest."""
    if a is None or b is None or c is None:
        return None
    if c == 0 or (a == 0 and b == 0):
        return Fraction(0)
    fbits = max(n - 3 - es, 0)
    ta, tb = _universal_triple(Fraction(a), n, es, fbits), _universal_triple(Fraction(b), n, es, fbits)
    top = max(ta[1], tb[1])

    def block(t):
        sign, scale, sig = t
        shift = scale - top + 3                     # hidden bit at fbits + shift
        if fbits + shift <= 0:
            mag = 1                                 # only the uncertainty bit
        else:
            placed = Fraction(sig) * Fraction(2) ** shift   # bit k of the block is 2^k
            kept = (int(placed) >> 1) << 1                  # positions >= 1
            mag = kept | (1 if placed != kept else 0)       # bit 0: anything at <= 0
        return -mag if sign else mag

    total = (block(ta) + block(tb)) * Fraction(2) ** (top - fbits - 3)
    if total == 0:
        return Fraction(0)
    return round_exact(total * Fraction(c), n, es)
