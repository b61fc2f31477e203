"""Error-free splitting of matrix rows into narrow slices (the Ozaki scheme).

A row whose nonzero entries all lie within ``w`` bits below its largest exponent gives an
exact float64 GEMM as it is. Wider rows are cut at bit positions e - w, e - 2w, ...
(e: the row's exponent), by clearing mantissa bits, which is exact and needs no scaling.
"""

import numpy as np
from numba import njit, prange

from .bits import f64_as_i64, i64_as_f64
from .rounding import MANT_MASK

NO_BITS = 1 << 30  # "lowest set bit" of an all-zero row


@njit(inline="always")
def _top_low(v):
    """(e, l) with |v| < 2**e and v a multiple of 2**l; (-NO_BITS, NO_BITS) for 0 and NaR.

    Subnormals are scaled up by 2**64 first (exactly), so they count like any number.
    """
    sub = abs(v) < 2.2250738585072014e-308
    w = v * 18446744073709551616.0 if sub else v
    shift = 64 if sub else 0
    u = f64_as_i64(w)
    biased = (u >> 52) & 0x7FF
    m = (u & MANT_MASK) | (np.int64(1) << 52)
    tz = (f64_as_i64(np.float64(m & -m)) >> 52) - 1023  # trailing zeros of m
    ok = (biased > 0) & (biased < 0x7FF)
    return (biased - 1022 - shift if ok else -NO_BITS), (biased - 1075 + tz - shift if ok else NO_BITS)


@njit(parallel=True, cache=True)
def scan_rows(x, top, low, copy, write_copy):
    """Per row r: top[r] = e with max|x[r]| < 2**e, low[r] = exponent of the lowest set bit.

    With ``write_copy`` the rows are also copied into ``copy`` as float64 in the same pass.
    Non-finite entries (NaR) are skipped: they propagate through the GEMM by themselves.
    """
    R, K = x.shape
    for r in prange(R):
        hi = -NO_BITS
        lo = NO_BITS
        for k in range(K):
            v = np.float64(x[r, k])
            if write_copy:
                copy[r, k] = v
            t, b = _top_low(v)
            hi = max(hi, t)
            lo = min(lo, b)
        top[r] = hi
        low[r] = lo


@njit(cache=True)
def row_extent(top, low):
    """(highest top, lowest low, widest top - low) over the rows that hold a nonzero
    finite entry (low < NO_BITS); (0, 0, -1) when none does."""
    hi, lo, span = -NO_BITS, NO_BITS, -1
    for r in range(top.size):
        if low[r] < NO_BITS:
            hi = max(hi, top[r])
            lo = min(lo, low[r])
            span = max(span, top[r] - low[r])
    return (hi, lo, span) if span >= 0 else (0, 0, -1)


@njit(inline="always")
def _truncate_at(v, p):
    """v with every bit below 2**p cleared (exact; v finite and normal or zero)."""
    u = f64_as_i64(v)
    e = ((u >> 52) & 0x7FF) - 1023
    keep = e - p + 1  # significand bits at or above 2**p
    drop = min(max(53 - keep, 0), 53)
    cleared = u & ~((np.int64(1) << drop) - 1) if drop < 53 else u & (np.int64(1) << 63)
    return i64_as_f64(cleared)


@njit(parallel=True, cache=True)
def split_rows(x, top, w, out):
    """out[b, s, r, :] = the bits of row (b, r) of x in [top - w(s+1), top - ws).

    x is (B*R, K) and out (B, S, R, K): the S slices of a row sum to it exactly, and each
    batch's slices stack into one (S*R, K) GEMM operand without a copy.
    """
    nb, S, R, K = out.shape
    for row in prange(nb * R):
        b = row // R
        r = row - b * R
        t = top[row]
        for k in range(K):
            rest = np.float64(x[row, k])
            if not np.isfinite(rest):
                out[b, 0, r, k] = rest
                for s in range(1, S):
                    out[b, s, r, k] = 0.0
                continue
            for s in range(S):
                cut = _truncate_at(rest, t - w * (s + 1))
                out[b, s, r, k] = cut
                rest = rest - cut


@njit(parallel=True, cache=True)
def global_span(x):
    """(top, low, nonfinite) over a flat array: max|x| < 2**top and every finite nonzero
    entry is a multiple of 2**low ((-NO_BITS, NO_BITS) when there are none), and how many
    entries are NaN or infinite, all in one pass."""
    hi = -NO_BITS
    lo = NO_BITS
    nonfinite = 0
    for i in prange(x.size):
        v = np.float64(x[i])
        t, b = _top_low(v)
        hi = max(hi, t)
        lo = min(lo, b)
        nonfinite += 0 if np.isfinite(v) else 1
    return hi, lo, nonfinite


@njit(parallel=True, cache=True)
def magnitude_range(x):
    """(hi, lo, nonfinite) over a flat array: 2**(lo - 1) <= |v| < 2**hi for every finite
    nonzero entry ((-NO_BITS, NO_BITS) when there are none), and how many entries are NaN
    or infinite, in one pass (the float quire modes' range check)."""
    hi = -NO_BITS
    lo = NO_BITS
    nonfinite = 0
    for i in prange(x.size):
        v = np.float64(x[i])
        t, _ = _top_low(v)
        hi = max(hi, t)
        lo = min(lo, t if t > -NO_BITS else NO_BITS)
        nonfinite += 0 if np.isfinite(v) else 1
    return hi, lo, nonfinite


@njit(parallel=True, cache=True)
def split_flat(x, top, w, out):
    """out[s, i] = the bits of x[i] in [top - w(s+1), top - ws), one common ``top`` for the
    whole flat array: the S slices sum to x exactly (finite normal or zero entries)."""
    S = out.shape[0]
    for i in prange(x.size):
        rest = np.float64(x[i])
        for s in range(S):
            cut = _truncate_at(rest, top - w * (s + 1))
            out[s, i] = cut
            rest = rest - cut
