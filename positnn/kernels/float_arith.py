"""Correctly rounded float-format arithmetic: exact result, one rounding.

The same error-free transformations as the posit kernels (``arith``): each op yields a
faithful float64 ``h`` and the sign of the remainder, and ``float_rounding.round_value``
needs nothing more because every midpoint of a supported format is a float64. What
differs is IEEE's exceptional cases: x / 0 is an infinity, and an infinite or exactly zero
``fma`` takes the hardware fma's result, which has IEEE's signs.
"""

import math

import numpy as np
from numba import njit, prange

from .arith import _product, fma, fma_parts, quotient, two_sum
from .float_rounding import round_value


@njit(parallel=True, cache=True)
def add(a, b, out, m, emin, maxv, over, infv, flush):
    for i in prange(out.size):
        s, t = two_sum(np.float64(a[i]), np.float64(b[i]))
        out[i] = round_value(s, t, m, emin, maxv, over, infv, flush)


@njit(parallel=True, cache=True)
def mul(a, b, out, m, emin, maxv, over, infv, flush):
    for i in prange(out.size):
        p, e = _product(np.float64(a[i]), np.float64(b[i]))
        out[i] = round_value(p, e, m, emin, maxv, over, infv, flush)


@njit(parallel=True, cache=True)
def div(a, b, out, m, emin, maxv, over, infv, flush):
    for i in prange(out.size):
        x = np.float64(a[i])
        y = np.float64(b[i])
        q, t = quotient(x, y)
        q = x / y if y == 0 else q  # +-inf for x != 0 (signed by the zero), NaN for 0/0
        t = 0.0 if y == 0 else t
        out[i] = round_value(q, t, m, emin, maxv, over, infv, flush)


@njit(parallel=True, cache=True)
def sqrt(a, out, m, emin, maxv, over, infv, flush):
    for i in prange(out.size):
        x = np.float64(a[i])
        q = math.sqrt(x) if x >= 0 else np.nan  # sqrt(-0) = -0
        r = fma(-q, q, x)  # sign(sqrt(x) - q) = sign(x - q*q)
        out[i] = round_value(q, r, m, emin, maxv, over, infv, flush)


@njit(parallel=True, cache=True)
def fused_multiply_add(a, b, c, out, m, emin, maxv, over, infv, flush):
    for i in prange(out.size):
        x = np.float64(a[i])
        y = np.float64(b[i])
        z = np.float64(c[i])
        h, rest = fma_parts(x, y, z)
        hw = fma(x, y, z)
        plain = (h == 0) | ~math.isfinite(h)
        h = hw if plain else h
        rest = 0.0 if plain else rest
        out[i] = round_value(h, rest, m, emin, maxv, over, infv, flush)
