"""Exact accumulation: multi-limb fixed-point integers, rounded once to a format.

A limb array holds sum(limbs[l] * 2**(LIMB * l)) in units of 2**lsb. Terms are added as
integers at a bit offset, so nothing is ever rounded; ``round_limbs`` then reads the top
60 bits, a faithful float64 and the sign of what lies below, which is all that
``round_fmt`` needs to round once, correctly.

The format reaches every kernel as one tuple ``rp`` (the format's ``_accumulate_params``):
``(kind, i1, i2, f1, f2, f3, flag)``, kind 0 a posit (n, es, -, -, -, underflow) and kind 1
a binary float (man_bits, min_exponent, max, overflow value, infinity value, flush). The
kernels branch on ``kind`` only in ``round_fmt``; everything else is format-free, since
posits and floats alike are integer multiples of their smallest positive value.
"""

import math

import numpy as np
from numba import njit, prange

from .arith import DBL_MAX, TINY, _product, two_sum
from .bits import f64_as_i64, i64_as_f64
from .float_rounding import round_value as float_round_value
from .rounding import MANT_MASK, round_value

LIMB = 20
LIMB_MASK = (1 << LIMB) - 1


@njit(inline="always")
def round_fmt(x, t, rp):
    """The value of the format ``rp`` nearest to the exact x + t: x a faithful float64,
    only the sign of t used to break ties (both rounding kernels share that contract)."""
    if rp[0] == 0:
        return round_value(x, t, rp[1], rp[2], rp[6])
    return float_round_value(x, t, rp[1], rp[2], rp[3], rp[4], rp[5], rp[6])


@njit(inline="always")
def pow2(k):
    """2.0 ** k for -1022 <= k <= 1023, built from its bits (exact)."""
    return i64_as_f64((k + 1023) << 52)


@njit(inline="always")
def add_int(limbs, off, v):
    """limbs += v * 2**off, for |v| < 2**60 and off >= 0 (no normalisation)."""
    q = off // LIMB
    r = off - q * LIMB
    m = -v if v < 0 else v
    s = -1 if v < 0 else 1
    limbs[q] += s * ((m & LIMB_MASK) << r)
    limbs[q + 1] += s * (((m >> LIMB) & LIMB_MASK) << r)
    limbs[q + 2] += s * ((m >> (2 * LIMB)) << r)


@njit(inline="always")
def float_parts(x):
    """x = mant * 2**exp with an integer mant (|mant| < 2**53), for finite x."""
    u = f64_as_i64(x)
    biased = (u >> 52) & 0x7FF
    mant = (u & MANT_MASK) | ((1 << 52) if biased > 0 else 0)
    exp = (biased if biased > 0 else 1) - 1075
    return (-mant if u < 0 else mant), exp


@njit(inline="always")
def normalize(limbs, nl):
    """Carry-propagate so that limbs[0..nl-2] are digits in [0, 2**LIMB); the top limb is signed."""
    carry = 0
    for l in range(nl - 1):
        x = limbs[l] + carry
        limbs[l] = x & LIMB_MASK
        carry = x >> LIMB
    limbs[nl - 1] += carry


@njit(inline="always")
def _scale(h, e):
    """h * 2**e for 1 <= h < 2**61, saturating far outside every posit range."""
    top = e + 61
    if top > 1000:
        return DBL_MAX
    if top < -1000:
        return TINY
    half = e // 2
    return h * pow2(half) * pow2(e - half)


@njit
def round_limbs(limbs, nl, lsb, rp):
    """The format value nearest to the limb integer times 2**lsb. Destroys ``limbs``."""
    normalize(limbs, nl)
    neg = limbs[nl - 1] < 0
    if neg:
        for l in range(nl):
            limbs[l] = -limbs[l]
        normalize(limbs, nl)
    t = nl - 1
    while t >= 0 and limbs[t] == 0:
        t -= 1
    if t < 0:
        return 0.0
    x = limbs[t] << (2 * LIMB)
    if t >= 1:
        x += limbs[t - 1] << LIMB
    if t >= 2:
        x += limbs[t - 2]
    sticky = False
    for l in range(t - 2):
        sticky |= limbs[l] != 0
    h0 = np.float64(x)
    d = x - np.int64(h0)
    tie = 1.0 if d > 0 else (-1.0 if d < 0 else (1.0 if sticky else 0.0))
    h = _scale(h0, lsb + LIMB * (t - 2))
    if neg:
        h, tie = -h, -tie
    return round_fmt(h, tie, rp)


@njit(parallel=True, cache=True)
def _round_sum(G, bias, bias_on_rows, out, rp):
    """out = round(G + bias) for exact float64 G (one slice pair): TwoSum is exact.

    The bias runs along the columns (bias[j]), or along the rows with ``bias_on_rows``.
    """
    nb, M, N = out.shape
    has_bias = bias.size > 0
    for bi in prange(nb * M):
        b = bi // M
        i = bi - b * M
        for j in range(N):
            bv = (bias[i] if bias_on_rows else bias[j]) if has_bias else 0.0
            s, err = two_sum(G[b, i, j], bv)
            out[b, i, j] = round_fmt(s, err, rp)


@njit(parallel=True, cache=True)
def _round_flat(G, out, rp):
    """round_sum without a bias on flat arrays: the same TwoSum with 0 and rounding per
    element, as one long loop (skinny GEMM results have rows of a few elements)."""
    for i in prange(G.size):
        s, err = two_sum(G[i], 0.0)
        out[i] = round_fmt(s, err, rp)


# Limbs for any finite float64 sum (2**-1074 to 2**1024, plus carries).
SUM_LIMBS = 2200 // LIMB + 8


@njit
def round_floats(terms, T, mants, exps, limbs, rp):
    """The format value nearest to the exact sum of terms[:T] (float64s): NaN if any is not
    finite, else their integer mantissas added into ``limbs`` (scratch, as are ``mants``
    and ``exps``) and rounded once."""
    lsb = 1 << 30
    top = -(1 << 30)
    for t in range(T):
        v = terms[t]
        if not np.isfinite(v):
            return np.nan
        m, ex = float_parts(v)
        mants[t] = m
        exps[t] = ex
        if m != 0:
            lsb = min(lsb, ex)
            top = max(top, ex + 53)
    if top < lsb:  # every term is zero
        return 0.0
    nl = (top - lsb + 16) // LIMB + 4
    limbs[:nl] = 0
    for t in range(T):
        if mants[t] != 0:
            add_int(limbs, exps[t] - lsb, mants[t])
    return round_limbs(limbs, nl, lsb, rp)


@njit(parallel=True, cache=True)
def _round_terms(G, P, Q, bias, out, rp):
    """out[b, i, j] = round(sum_pq G[b, pM + i, qN + j] + bias[j]) exactly.

    The terms are exact float64 slice-GEMM results; they are added as integers into limbs.
    """
    nb, M, N = out.shape
    has_bias = bias.size > 0
    T = P * Q + 1
    for bi in prange(nb * M):
        b = bi // M
        i = bi - b * M
        terms = np.empty(T, dtype=np.float64)
        mants = np.empty(T, dtype=np.int64)
        exps = np.empty(T, dtype=np.int64)
        limbs = np.zeros(SUM_LIMBS, dtype=np.int64)
        for j in range(N):
            for t in range(P * Q):
                p = t // Q
                terms[t] = G[b, p * M + i, (t - p * Q) * N + j]
            terms[T - 1] = bias[j] if has_bias else 0.0
            out[b, i, j] = round_floats(terms, T, mants, exps, limbs, rp)


@njit(parallel=True, cache=True)
def quire_add(limbs, terms, lsb, apply):
    """Add float terms (exact multiples of 2**lsb) into per-element limb rows.

    Returns how many terms are not multiples of 2**lsb or too large for the rows; with
    ``apply`` False it only counts, so that a caller can refuse a batch as a whole.
    """
    bad = 0
    nl = limbs.shape[1]
    for i in prange(terms.size):
        t = terms[i]
        if t == 0 or not math.isfinite(t):
            continue
        m, ex = float_parts(t)
        mag = -m if m < 0 else m
        tz = (f64_as_i64(np.float64(mag & -mag)) >> 52) - 1023  # trailing zeros of m
        m = m >> tz  # exact: the low tz bits are zero
        ex += tz
        if ex < lsb or ex - lsb + 64 > (nl - 3) * LIMB:
            bad += 1
        elif apply:
            row = limbs[i]
            add_int(row, ex - lsb, m)
            normalize(row, nl)
    return bad


@njit(parallel=True, cache=True)
def _quire_round(limbs, lsb, out, rp):
    nl = limbs.shape[1]
    for i in prange(out.size):
        scratch = limbs[i].copy()
        out[i] = round_limbs(scratch, nl, lsb, rp)


@njit(parallel=True, cache=True)
def _sequential_dot(A, B, bias, out, rp):
    """No quire: acc = bias; acc = round(acc + round(a_k * b_k)) in order over k.

    The columns j of one row are independent, so they form the inner (SIMD) loop. A zero
    a_k leaves every acc unchanged (acc is a posit) unless row k of B holds NaR.
    """
    nb, M, N = out.shape
    K = A.shape[2]
    has_bias = bias.size > 0
    for bi in prange(nb * M):
        b = bi // M
        i = bi - b * M
        acc = np.zeros(N, dtype=np.float64)
        if has_bias:
            for j in range(N):
                acc[j] = round_fmt(np.float64(bias[j]), 0.0, rp)
        for k in range(K):
            a = np.float64(A[b, i, k])
            if a == 0:
                clean = True
                for j in range(N):
                    clean &= np.isfinite(B[b, k, j])
                if clean:
                    continue
            if rp[0] == 0:  # the format's kind decided once per k, not per element: SIMD loops
                for j in range(N):
                    p, pe = _product(a, np.float64(B[b, k, j]))
                    prod = round_value(p, pe, rp[1], rp[2], rp[6])
                    s, err = two_sum(acc[j], prod)
                    acc[j] = round_value(s, err, rp[1], rp[2], rp[6])
            else:
                for j in range(N):
                    p, pe = _product(a, np.float64(B[b, k, j]))
                    prod = round_fmt(p, pe, rp)
                    s, err = two_sum(acc[j], prod)
                    acc[j] = round_fmt(s, err, rp)
        for j in range(N):
            out[b, i, j] = acc[j]


# Results narrower than a SIMD vector of float64 (a convolution's few channels) take the
# row-blocked loop order; its blocks are this many rows.
NARROW_COLUMNS = 8
ROW_BLOCK = 16


@njit(parallel=True, cache=True)
def _sequential_dot_rows(A, B, bias, out, rp):
    """``_sequential_dot`` with blocks of rows as the inner (SIMD) loop, for results of few
    columns. Each output still starts at its rounded bias and adds its rounded products in
    order over k, and a zero a_k is skipped exactly when the sequential kernel skips it
    (row k of B free of NaR), so every bit, a -0 included, is the same."""
    nb, M, N = out.shape
    K = A.shape[2]
    has_bias = bias.size > 0
    clean = np.empty((nb, K), dtype=np.bool_)
    for b in prange(nb):
        for k in range(K):
            c = True
            for j in range(N):
                c &= np.isfinite(B[b, k, j])
            clean[b, k] = c
    R = ROW_BLOCK
    blocks = -(-M // R)
    for t in prange(nb * blocks):
        b = t // blocks
        i0 = (t - b * blocks) * R
        rows = min(R, M - i0)
        At = np.zeros((K, R), dtype=np.float64)  # the block's rows, contiguous along the rows
        for r in range(rows):
            for k in range(K):
                At[k, r] = A[b, i0 + r, k]
        acc = np.empty(R, dtype=np.float64)
        for j in range(N):
            start = round_fmt(np.float64(bias[j]), 0.0, rp) if has_bias else 0.0
            for r in range(R):
                acc[r] = start
            for k in range(K):
                bv = np.float64(B[b, k, j])
                skip_zero = clean[b, k]
                if rp[0] == 0:
                    for r in range(R):
                        a = At[k, r]
                        p, pe = _product(a, bv)
                        prod = round_value(p, pe, rp[1], rp[2], rp[6])
                        s, err = two_sum(acc[r], prod)
                        new = round_value(s, err, rp[1], rp[2], rp[6])
                        acc[r] = acc[r] if (a == 0) & skip_zero else new
                else:
                    for r in range(R):
                        a = At[k, r]
                        p, pe = _product(a, bv)
                        prod = round_fmt(p, pe, rp)
                        s, err = two_sum(acc[r], prod)
                        new = round_fmt(s, err, rp)
                        acc[r] = acc[r] if (a == 0) & skip_zero else new
            for r in range(rows):
                out[b, i0 + r, j] = acc[r]


def _sequential(A, B, bias, out, rp):
    """No quire: acc = bias; acc = round(acc + round(a_k * b_k)) in order over k, for out
    (B, M, N); the loop order that suits the shape (the same bits either way)."""
    narrow = out.shape[2] < NARROW_COLUMNS and out.shape[1] >= ROW_BLOCK
    (_sequential_dot_rows if narrow else _sequential_dot)(A, B, bias, out, rp)


@njit(parallel=True, cache=True)
def _round_stack(G, bias, bias_on_rows, out, rp):
    """out[b, i, j] = round(sum_t G[t, b, i, j] + bias) exactly, for exact float64 terms
    (the slice-pair results of a sliced convolution). The bias runs along the columns
    (bias[j]), or along the rows with ``bias_on_rows``. Terms are added by TwoSum while
    the errors add up exactly (nearly always); otherwise in limbs."""
    T = G.shape[0]
    nb, M, N = out.shape
    has_bias = bias.size > 0
    for bi in prange(nb * M):
        b = bi // M
        i = bi - b * M
        # Fast pass, term by term along the row (a SIMD loop over j): sum = s + err
        # exactly while every addition of the TwoSum errors is itself exact (f == 0).
        s = np.empty(N, dtype=np.float64)
        err = np.zeros(N, dtype=np.float64)
        exact = np.ones(N, dtype=np.bool_)
        for j in range(N):
            s[j] = G[0, b, i, j]
        for t in range(1, T + 1):
            for j in range(N):
                v = G[t, b, i, j] if t < T else ((bias[i] if bias_on_rows else bias[j]) if has_bias else 0.0)
                sj, e = two_sum(s[j], v)
                ej, f = two_sum(err[j], e)
                s[j], err[j] = sj, ej
                exact[j] &= f == 0.0
        slow = 0
        for j in range(N):
            sj, e = two_sum(s[j], err[j])
            out[b, i, j] = round_fmt(sj, e, rp)
            slow += 0 if exact[j] else 1
        if slow:
            _round_stack_limbs(G, bias, bias_on_rows, has_bias, b, i, exact, out, rp)


@njit
def _round_stack_limbs(G, bias, bias_on_rows, has_bias, b, i, exact, out, rp):
    """The elements of row (b, i) that ``_round_stack``'s fast pass could not add exactly,
    summed as integers in limbs and rounded once."""
    T = G.shape[0]
    terms = np.empty(T + 1, dtype=np.float64)
    mants = np.empty(T + 1, dtype=np.int64)
    exps = np.empty(T + 1, dtype=np.int64)
    limbs = np.zeros(SUM_LIMBS, dtype=np.int64)
    for j in range(out.shape[2]):
        if exact[j]:
            continue
        for t in range(T):
            terms[t] = G[t, b, i, j]
        terms[T] = (bias[i] if bias_on_rows else bias[j]) if has_bias else 0.0
        out[b, i, j] = round_floats(terms, T + 1, mants, exps, limbs, rp)


def posit_params(n: int, es: int, underflow: bool) -> tuple:
    """The ``rp`` tuple of posit(n, es) (what ``Posit._accumulate_params`` returns)."""
    return (0, int(n), int(es), 0.0, 0.0, 0.0, bool(underflow))


def _entry(kernel):
    """A kernel's public form: the format as one ``rp`` tuple, or as a posit's trailing
    (n, es, underflow), the signature these kernels had before float formats."""

    def call(*args):
        if isinstance(args[-1], tuple):
            return kernel(*args)
        return kernel(*args[:-3], posit_params(*args[-3:]))

    call.__name__, call.__doc__ = kernel.__name__.lstrip("_"), kernel.__doc__
    return call


round_sum = _entry(_round_sum)
round_flat = _entry(_round_flat)
round_terms = _entry(_round_terms)
quire_round = _entry(_quire_round)
sequential_dot = _entry(_sequential)
round_stack = _entry(_round_stack)
