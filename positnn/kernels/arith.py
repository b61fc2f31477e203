"""Correctly rounded posit arithmetic: exact result, one rounding.

A float64 result is not exact for posit(n >= 29) operands, so each op carries its exact
value as a float64 ``h`` (a faithful rounding) plus the sign of the remainder, found with
error-free transformations (TwoSum, an FMA for the product error, the division and square
root remainders). ``round_value`` needs nothing more: every rounding boundary is a float64,
so only a ``h`` that sits exactly on a boundary needs the remainder's sign.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .rounding import round_value

DBL_MAX = np.finfo(np.float64).max
# Below every posit(n <= 32, es <= 5) rounding boundary (>= 2**-992), and normal.
TINY = 2.0**-1000


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c with one rounding (LLVM's fma intrinsic)."""
    if not (a == b == c == types.float64):
        return None
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f64], ir.FunctionType(f64, [f64, f64, f64]))
        return builder.call(fn, args)

    return sig, codegen


@njit(inline="always")
def two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(inline="always")
def _product(a, b):
    """a * b as (p, e) with p + e exact; out-of-range p is clamped to keep its rounding."""
    p = a * b
    e = fma(a, b, -p)
    big = math.isinf(p) & ~(math.isinf(a) | math.isinf(b))
    under = (abs(p) < TINY) & (a != 0) & (b != 0)
    sgn = -1.0 if (a < 0) != (b < 0) else 1.0
    e = 0.0 if (big | under) else e
    p = sgn * DBL_MAX if big else (sgn * TINY if under else p)
    return p, e


@njit(inline="always")
def quotient(x, y):
    """x / y as (q, t): q faithful, t with the sign of x/y - q; clamped like ``_product``.
    y == 0 is left to the caller (q is then inf or NaN)."""
    q = x / y
    r = fma(-q, y, x)  # exact remainder: sign(x/y - q) = sign(r) * sign(y)
    t = r if y > 0 else -r
    big = math.isinf(q) & ~math.isinf(x)
    under = (abs(q) < TINY) & (x != 0) & ~math.isinf(y)
    sgn = -1.0 if (x < 0) != (y < 0) else 1.0
    t = 0.0 if (big | under) else t
    q = sgn * DBL_MAX if big else (sgn * TINY if under else q)
    return q, t


@njit(inline="always")
def fma_parts(a, b, c):
    """a * b + c as (h, rest): the exact value p + e + c renormalised to h + (r + t_err),
    h faithful and rest with the sign of the remainder; h = 0 only for an exact zero."""
    p, e = _product(a, b)
    s, u = two_sum(p, c)
    t, t_err = two_sum(u, e)
    h, r = two_sum(s, t)
    rest = r + t_err  # only its sign is used
    h2 = rest if h == 0 else h
    rest = 0.0 if h == 0 else rest
    return h2, rest


@njit(parallel=True, cache=True)
def add(a, b, out, n, es, underflow):
    for i in prange(out.size):
        s, t = two_sum(np.float64(a[i]), np.float64(b[i]))
        out[i] = round_value(s, t, n, es, underflow)


@njit(parallel=True, cache=True)
def mul(a, b, out, n, es, underflow):
    for i in prange(out.size):
        p, e = _product(np.float64(a[i]), np.float64(b[i]))
        out[i] = round_value(p, e, n, es, underflow)


@njit(parallel=True, cache=True)
def div(a, b, out, n, es, underflow):
    for i in prange(out.size):
        x = np.float64(a[i])
        y = np.float64(b[i])
        q, t = quotient(x, y)
        q = np.nan if y == 0 else q
        out[i] = round_value(q, t, n, es, underflow)


@njit(parallel=True, cache=True)
def sqrt(a, out, n, es, underflow):
    for i in prange(out.size):
        x = np.float64(a[i])
        q = math.sqrt(x) if x >= 0 else np.nan
        r = fma(-q, q, x)  # sign(sqrt(x) - q) = sign(x - q*q)
        out[i] = round_value(q, r, n, es, underflow)


@njit(parallel=True, cache=True)
def fused_multiply_add(a, b, c, out, n, es, underflow):
    """round(a*b + c): the exact value is p + e + c, renormalised to h + (r + t_err)."""
    for i in prange(out.size):
        h, rest = fma_parts(np.float64(a[i]), np.float64(b[i]), np.float64(c[i]))
        out[i] = round_value(h, rest, n, es, underflow)
