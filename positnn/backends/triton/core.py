"""Triton device functions: posit rounding on float64 bit patterns and the error-free
transformations of correctly rounded arithmetic.

Each function is a line-for-line translation of its numba twin in ``positnn.kernels``
(``rounding.round_abs``/``round_value``, ``arith.two_sum``/``_product``/``quotient``/
``fma_parts``): the same integer operations, the same clamps on shift counts, both
candidates computed and one selected with ``tl.where``. That is what makes the results bit
for bit those of the numba backend; the tests check it exhaustively on small formats.
The format (``n``, ``es``) and the ``underflow`` flag are compile-time constants.
"""

import triton
import triton.language as tl

MANT_MASK = tl.constexpr((1 << 52) - 1)
EXP_INF = tl.constexpr(0x7FF << 52)
NAN_BITS = tl.constexpr(0x7FF8 << 48)
DBL_MAX = tl.constexpr(1.7976931348623157e308)
TINY = tl.constexpr(2.0**-1000)  # below every posit(n <= 32, es <= 5) boundary, normal


@triton.jit
def as_i64(x):
    return x.to(tl.int64, bitcast=True)


@triton.jit
def as_f64(u):
    return u.to(tl.float64, bitcast=True)


@triton.jit
def round_abs(a, tie, n: tl.constexpr, es: tl.constexpr, underflow: tl.constexpr):
    """(lo, hi, up): the posits at or below and above |x| (float64 bits ``a``, finite)
    and whether round-to-nearest-even picks ``hi``; ``tie`` is the sign of the exact
    value minus |x| (0 when |x| is exact). As ``kernels.rounding.round_abs``."""
    maxexp: tl.constexpr = (n - 2) << es
    one = tl.full(a.shape, 1, tl.int64)
    E = (a >> 52) - 1023
    k = E >> es
    rlen = tl.where(k >= 0, k + 2, 1 - k)
    avail = n - 1 - rlen
    b = a + (one << 52)  # exponent biased by 1024: its low es bits are E's (see the numba core)
    shift = tl.minimum(tl.maximum(52 + es - avail, 1), 62)
    rem = b & ((one << shift) - 1)
    half = one << (shift - 1)
    lsb = tl.where(avail > 0, (b >> shift) & 1, tl.where(k < 0, 1, 0))
    lo = b - rem - (one << 52)
    hi = lo + (one << shift)
    up = (rem > half) | ((rem == half) & ((tie > 0) | ((tie == 0) & (lsb == 1))))

    maxpos = tl.full(a.shape, (maxexp + 1023) << 52, tl.int64)
    minpos = tl.full(a.shape, (1023 - maxexp) << 52, tl.int64)
    tiny: tl.constexpr = (1023 - maxexp - (1 << es)) << 52
    big = E >= maxexp
    small = E < -maxexp
    lo = tl.where(big, maxpos, tl.where(small, 0, lo))
    hi = tl.where(big, maxpos, tl.where(small, minpos, hi))
    if underflow:
        up_small = (a > tiny) | ((a == tiny) & (tie > 0))
    else:
        up_small = a == a
    up = tl.where(big, False, tl.where(small, up_small, up))
    return lo, hi, up


@triton.jit
def round_value(x, t, n: tl.constexpr, es: tl.constexpr, underflow: tl.constexpr):
    """The posit nearest to the exact value x + t (float64; only t's sign is used, to
    break a tie when x sits on a midpoint). As ``kernels.rounding.round_value``."""
    u = as_i64(x)
    a = u & 0x7FFFFFFFFFFFFFFF
    sign = u & (-9223372036854775807 - 1)
    st = tl.where(t > 0, 1, tl.where(t < 0, -1, 0))
    tie = tl.where(u < 0, -st, st)
    lo, hi, up = round_abs(a, tie, n, es, underflow)
    r = tl.where(up, hi, lo) | sign
    r = tl.where(a != 0, r, u)
    r = tl.where(a < EXP_INF, r, NAN_BITS)
    return as_f64(r)


@triton.jit
def two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def signed(neg, value: tl.constexpr, like):
    """+-value as float64 tensors shaped like ``like`` (a bare float literal would be a
    float32 in Triton: DBL_MAX would become inf and 2**-1000 zero)."""
    v = tl.full(like.shape, value, tl.float64)
    return tl.where(neg, -v, v)


@triton.jit
def product(a, b):
    """a * b as (p, e) with p + e exact; out-of-range p clamped (``arith._product``)."""
    p = a * b
    e = tl.fma(a, b, -p)
    ainf = (a == float("inf")) | (a == float("-inf"))
    binf = (b == float("inf")) | (b == float("-inf"))
    pinf = (p == float("inf")) | (p == float("-inf"))
    big = pinf & ~(ainf | binf)
    under = (tl.abs(p) < TINY) & (a != 0) & (b != 0)
    neg = (a < 0) != (b < 0)
    e = tl.where(big | under, 0.0, e)
    p = tl.where(big, signed(neg, DBL_MAX, p), tl.where(under, signed(neg, TINY, p), p))
    return p, e


@triton.jit
def quotient(x, y):
    """x / y as (q, t): q faithful, t with the sign of x/y - q (``arith.quotient``)."""
    q = x / y  # IEEE division for float64 (div.rn.f64)
    r = tl.fma(-q, y, x)
    t = tl.where(y > 0, r, -r)
    qinf = (q == float("inf")) | (q == float("-inf"))
    xinf = (x == float("inf")) | (x == float("-inf"))
    yinf = (y == float("inf")) | (y == float("-inf"))
    big = qinf & ~xinf
    under = (tl.abs(q) < TINY) & (x != 0) & ~yinf
    neg = (x < 0) != (y < 0)
    t = tl.where(big | under, 0.0, t)
    q = tl.where(big, signed(neg, DBL_MAX, q), tl.where(under, signed(neg, TINY, q), q))
    return q, t


@triton.jit
def fma_parts(a, b, c):
    """a * b + c as (h, rest), h faithful and rest with the remainder's sign
    (``arith.fma_parts``)."""
    p, e = product(a, b)
    s, u = two_sum(p, c)
    t, t_err = two_sum(u, e)
    h, r = two_sum(s, t)
    rest = r + t_err
    h2 = tl.where(h == 0, rest, h)
    rest = tl.where(h == 0, 0.0, rest)
    return h2, rest
