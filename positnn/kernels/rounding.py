"""Fused numba kernels: rounding to posit(n, es), encoding and decoding.

All kernels work on the float64 bit pattern of a value, with integer arithmetic only, so
they are exact for every posit(n <= 32, es <= 5): every such posit, every (n+1)-bit
midpoint and every underflow threshold is a normal float64.

The scalar core ``round_abs`` is written as "compute the candidates, then select", with
no early exits, so that LLVM turns the element loop into SIMD code.
"""

import numpy as np
from numba import njit, prange

from .bits import f64_as_i64, i64_as_f64

MANT_MASK = (1 << 52) - 1
EXP_INF = 0x7FF << 52
NAN_BITS = 0x7FF8 << 48
SIGN_BIT = -(1 << 63)  # 0x8000...0 as int64


@njit(inline="always")
def round_abs(a, tie, n, es, maxexp, underflow):
    """Neighbours of the magnitude |x| (float64 bits ``a``, finite) and the RNE choice.

    ``tie`` is the sign of (exact value - |x|) when |x| stands for a longer exact value
    (error-free transformations); 0 when |x| is the exact value. Returns
    (lo_bits, hi_bits, round_up): the posits at or below and above |x| and whether
    round-to-nearest-even picks ``hi``.
    """
    E = (a >> 52) - 1023
    k = E >> es
    rlen = k + 2 if k >= 0 else 1 - k
    avail = n - 1 - rlen  # pattern bits left after the regime

    # After the regime a posit holds the low es bits of E, then the fraction. In b, the
    # bits of |x| with the exponent biased by 1024 instead of 1023 (a multiple of 2**es),
    # the exponent field ends in those same es bits, so the pattern's tail is b's low
    # 52 + es bits: rounding the pattern to ``avail`` bits (ties to even on the (n+1)-bit
    # midpoint) is rounding b at bit 52 + es - avail, wherever that cut lies, in the
    # fraction or in the exponent; a carry ripples into the next posit. Where no exponent
    # bit is left, the pattern's last bit, which decides ties, is the regime's.
    b = a + (1 << 52)
    shift = min(max(52 + es - avail, 1), 62)
    rem = b & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    lsb = ((b >> shift) & 1) if avail > 0 else (1 if k < 0 else 0)
    lo = b - rem - (1 << 52)
    hi = lo + (1 << shift)
    up = (rem > half) | ((rem == half) & ((tie > 0) | ((tie == 0) & (lsb == 1))))

    # Outside [minpos, maxpos]: saturate; below minpos only the underflow rule gives 0.
    maxpos = (maxexp + 1023) << 52
    minpos = (1023 - maxexp) << 52
    tiny = (1023 - maxexp - (1 << es)) << 52
    big = E >= maxexp
    small = E < -maxexp
    lo = maxpos if big else (0 if small else lo)
    hi = maxpos if big else (minpos if small else hi)
    up_small = (not underflow) | (a > tiny) | ((a == tiny) & (tie > 0))
    up = False if big else (up_small if small else up)
    return lo, hi, up


@njit(inline="always")
def round_value(x, t, n, es, underflow):
    """Posit nearest to the exact value x + t (float64s).

    x must be a faithful rounding of the exact value, and only the sign of t is used: it
    breaks a tie when x sits exactly on a midpoint. t = 0 rounds x itself.
    """
    maxexp = (n - 2) << es
    u = f64_as_i64(x)
    a = u & ~SIGN_BIT
    tie = (1 if t > 0 else (-1 if t < 0 else 0)) * (-1 if u < 0 else 1)
    lo, hi, up = round_abs(a, tie, n, es, maxexp, underflow)
    r = (hi if up else lo) | (u & SIGN_BIT)
    r = r if a != 0 else u
    r = r if a < EXP_INF else NAN_BITS
    return i64_as_f64(r)


@njit(parallel=True, cache=True)
def round_nearest(x, out, n, es, underflow):
    """out[i] = posit(n, es) nearest to x[i] (flat arrays; out may be float32)."""
    for i in prange(x.size):
        out[i] = round_value(np.float64(x[i]), 0.0, n, es, underflow)


@njit(parallel=True, cache=True)
def round_stochastic(x, rand, out, n, es, underflow):
    """Round up with probability (|x| - lo) / (hi - lo), using uniforms ``rand`` in [0, 1)."""
    maxexp = (n - 2) << es
    for i in prange(x.size):
        v = np.float64(x[i])
        u = f64_as_i64(v)
        a = u & ~SIGN_BIT
        lo, hi, up = round_abs(a, 0, n, es, maxexp, underflow)
        flo = i64_as_f64(lo)
        fhi = i64_as_f64(hi)
        span = fhi - flo
        p = (abs(v) - flo) / span if span > 0 else 0.0
        # Below minpos without the underflow rule there is no lower neighbour to pick.
        p = 1.0 if (lo == 0 and not underflow) else p
        r = (hi if rand[i] < p else lo) | (u & SIGN_BIT)
        r = r if a != 0 else u
        r = r if a < EXP_INF else NAN_BITS
        out[i] = i64_as_f64(r)


@njit(parallel=True, cache=True)
def encode(x, out, n, es):
    """Bit patterns of posit values; returns how many inputs were not posits."""
    maxexp = (n - 2) << es
    nar = -(1 << (n - 1))
    maxpat = (1 << (n - 1)) - 1
    bad = 0
    for i in prange(x.size):
        u = f64_as_i64(np.float64(x[i]))
        a = u & ~SIGN_BIT
        E = (a >> 52) - 1023
        k = E >> es
        k = min(max(k, -40), 40)  # out-of-range values: keep the shifts defined
        rlen = k + 2 if k >= 0 else 1 - k
        avail = min(max(n - 1 - rlen, 0), 31)
        regime = (((1 << (k + 1)) - 1) << 1) if k >= 0 else 1
        regime = regime if k < n - 2 else maxpat
        tail = ((E - (k << es)) << 52) | (a & MANT_MASK)
        drop = 52 + es - avail
        p = (regime << avail) | (tail >> drop)
        ok = ((tail & ((1 << drop) - 1)) == 0) | (k == n - 2)
        ok = ok & (E >= -maxexp) & (E <= maxexp) & (((a & MANT_MASK) == 0) | (E < maxexp))
        p = -p if u < 0 else p
        p = 0 if a == 0 else p
        p = nar if a >= EXP_INF else p
        nonposit = (a != 0) & (a < EXP_INF) & ~ok
        bad += 1 if nonposit else 0
        out[i] = p
    return bad


@njit(inline="always")
def _bit_length(y):
    """Number of significant bits of 0 <= y < 2**53, via the float64 exponent."""
    return ((f64_as_i64(np.float64(y)) >> 52) - 1022) if y > 0 else 0


@njit(parallel=True, cache=True)
def decode(bits, out, n, es):
    """Values of n-bit patterns (the low n bits of each integer)."""
    mask = (1 << (n - 1)) - 1
    for i in prange(bits.size):
        p = (np.int64(bits[i]) << (64 - n)) >> (64 - n)  # sign-extend the low n bits
        a = -p if p < 0 else p
        top = (a >> (n - 2)) & 1
        y = (~a & mask) if top == 1 else a
        run = (n - 1) - _bit_length(y)
        k = run - 1 if top == 1 else -run
        rem = max(n - 2 - run, 0)
        tail = a & ((1 << rem) - 1)
        fb = max(rem - es, 0)
        e = (tail >> fb) if rem >= es else (tail << (es - rem))
        frac = tail & ((1 << fb) - 1)
        r = (((k << es) + e + 1023) << 52) | (frac << (52 - fb))
        r = r | SIGN_BIT if p < 0 else r
        r = 0 if p == 0 else r
        r = NAN_BITS if p == -(1 << (n - 1)) else r
        out[i] = i64_as_f64(r)
