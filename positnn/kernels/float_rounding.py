"""Fused numba kernels: rounding to a binary float format, encoding and decoding.

A format is passed as ``(m, emin, maxv, over, infv, flush)``: mantissa bits, the exponent
of the smallest normal, the largest finite value, what a finite overflow becomes, what an
infinite value becomes, and whether results below the smallest normal flush to 0/normal.
Every value, midpoint and scale of a supported format (exponent bits <= 10, mantissa bits
<= 51) is a normal float64, so scaling |x| by a power of two is exact and rounding is
``floor`` plus a look at the fraction left over; the kernels select, never branch, so the
element loops vectorise.
"""

import math

import numpy as np
from numba import njit, prange

from .bits import f64_as_i64, i64_as_f64

EXP_MASK = 0x7FF


@njit(inline="always")
def _pow2(k):
    """2.0 ** k for a normal-range integer k, built from the bits (no libm call)."""
    return i64_as_f64((k + 1023) << 52)


@njit(inline="always")
def _scaled(x, m, emin, flush):
    """|x| in units of the format's spacing at |x|: (y, scale) with |x| = y * scale, so the
    neighbours are floor(y) * scale and (floor(y) + 1) * scale. Below the smallest normal
    the spacing is that of the subnormals, or the whole [0, min normal] when flushing."""
    a = abs(x)
    e = ((f64_as_i64(a) >> 52) & EXP_MASK) - 1023  # float64 subnormals read as -1023: below emin
    tiny = e < emin
    q = max(e, emin) - (0 if (tiny & flush) else m)
    return a * _pow2(-q), _pow2(q)


@njit(inline="always")
def _finish(x, r, maxv, over, infv):
    """Apply overflow, infinities, NaN and the sign of x to the rounded magnitude r."""
    r = over if r > maxv else r
    r = infv if math.isinf(x) else r
    r = math.copysign(r, x)
    return np.nan if math.isnan(x) else r


@njit(inline="always")
def round_value(x, t, m, emin, maxv, over, infv, flush):
    """Nearest format value to the exact x + t (float64s), ties to even.

    x must be a faithful rounding of the exact value; only the sign of t is used, to break
    a tie when x sits exactly on a midpoint (every midpoint is a float64). t = 0 rounds x.
    """
    y, scale = _scaled(x, m, emin, flush)
    lo = math.floor(y)
    frac = y - lo  # exact: y < 2**52
    odd = math.floor(lo * 0.5) != lo * 0.5
    tie = t if x >= 0 else -t  # > 0: the exact magnitude is above |x|
    up = (frac > 0.5) | ((frac == 0.5) & ((tie > 0) | ((tie == 0) & odd)))
    return _finish(x, (lo + (1.0 if up else 0.0)) * scale, maxv, over, infv)


@njit(parallel=True, cache=True)
def round_nearest(x, out, m, emin, maxv, over, infv, flush):
    """out[i] = the format value nearest to x[i] (flat arrays; out may be float32)."""
    for i in prange(x.size):
        out[i] = round_value(np.float64(x[i]), 0.0, m, emin, maxv, over, infv, flush)


@njit(parallel=True, cache=True)
def round_stochastic(x, rand, out, m, emin, maxv, over, infv, flush):
    """Round up with probability (|x| - lo) / (hi - lo), using uniforms ``rand`` in [0, 1)."""
    for i in prange(x.size):
        v = np.float64(x[i])
        y, scale = _scaled(v, m, emin, flush)
        lo = math.floor(y)
        up = rand[i] < y - lo
        out[i] = _finish(v, (lo + (1.0 if up else 0.0)) * scale, maxv, over, infv)


@njit(parallel=True, cache=True)
def encode(x, out, m, emin, maxv, fn, subnormals, nbits):
    """Bit patterns (sign-extended to the integer ``out``); returns how many inputs were
    not format values. NaN becomes the canonical positive quiet NaN."""
    top = (1 << (nbits - 1)) - 1  # all exponent and mantissa bits set
    nan_bits = top if fn else (top - (1 << (m - 1)) + 1)
    inf_bits = top - (1 << m) + 1
    bad = 0
    for i in prange(x.size):
        v = np.float64(x[i])
        y, scale = _scaled(v, m, emin, False)
        e = ((f64_as_i64(abs(v)) >> 52) & EXP_MASK) - 1023
        k = np.int64(y) if y < 2.0**62 else 0  # guarded: huge non-values stay defined
        p = k + ((max(e, emin) - emin) << m)
        ok = (y == math.floor(y)) & (abs(v) <= maxv) & (subnormals | (k >= (1 << m)) | (k == 0))
        p = inf_bits if math.isinf(v) else p
        ok = (not fn) if math.isinf(v) else ok
        p = nan_bits if math.isnan(v) else p
        ok = True if math.isnan(v) else ok
        p = p | ((1 << (nbits - 1)) if (v < 0 or (v == 0 and math.copysign(1.0, v) < 0)) else 0)
        bad += 0 if ok else 1
        out[i] = (p << (64 - nbits)) >> (64 - nbits)
    return bad


@njit(parallel=True, cache=True)
def decode(bits, out, m, emin, fn, subnormals, nbits):
    """Values of bit patterns (the low ``nbits`` bits of each integer)."""
    emask = (1 << (nbits - 1 - m)) - 1
    mmask = (1 << m) - 1
    for i in prange(bits.size):
        p = np.int64(bits[i])
        field = (p >> m) & emask
        mant = p & mmask
        sub = (mant * _pow2(emin - m)) if subnormals else 0.0
        r = sub if field == 0 else _pow2(field - 1 + emin) * (1.0 + mant * _pow2(-m))
        special = field == emask
        r = (np.nan if (mant == mmask) else r) if (special & fn) else r
        r = (np.inf if mant == 0 else np.nan) if (special & (not fn)) else r
        out[i] = -r if (p >> (nbits - 1)) & 1 else r
