"""No-quire dot products of narrow formats (posits, fp8) by table look-up on bit patterns.

``accumulate.sequential_dot`` rounds every product and every addition of float64 values.
Both operations are functions of two n-bit patterns, so they are tables of 2**(2n)
patterns (64K entries for 8 bits, 16M for 12), built once per format and underflow option
*with the very same scalar code* (``_product``, ``two_sum``, ``round_fmt``): the look-up
path is bit-identical to the float path whenever every operand is a value of the format.

Patterns are stored unsigned (the low n bits), as the format encodes them: uint8 up to 8
bits, uint16 above.
"""

import numpy as np
from numba import njit, prange

from .accumulate import round_fmt
from .arith import _product, two_sum


@njit(parallel=True, cache=True)
def build(vals, rp, p0, prods, sums):
    """prods[r, q] = round(v_p * v_q) and sums[r, q] = round(v_p + v_q), p = p0 + r, for the
    values ``vals`` of the format ``rp`` (``accumulate.round_fmt``), with the scalar code
    of ``accumulate.sequential_dot``; the caller encodes them as patterns, a block of
    rows at a time."""
    R, S = prods.shape
    for r in prange(R):
        a = vals[p0 + r]
        for q in range(S):
            b = vals[q]
            pr, pe = _product(a, b)
            prods[r, q] = round_fmt(pr, pe, rp)
            s, err = two_sum(a, b)
            sums[r, q] = round_fmt(s, err, rp)


def float32_keys(vals: np.ndarray, nan_pattern: int, shift: int, dtype):
    """(keys, bits) for the format whose pattern p has value vals[p], every one a float32:
    keys[u >> shift] is the pattern of the float32 with bits u, for every value of the
    format (and both zeros: -0 is looked up as +0, which no-quire sums cannot tell apart,
    since they start at +0), ``nan_pattern`` for every other inf or NaN; bits[p] the
    float32 bits of pattern p's value, to check that a looked-up value is that value. The
    top 32 - shift bits identify every value of at most 23 - shift fraction bits."""
    S = vals.size
    bits = vals.astype(np.float32).view(np.uint32).copy()
    keys = np.zeros(1 << (32 - shift), dtype=dtype)
    inf, neg = 0x7F800000 >> shift, 0x80000000 >> shift
    keys[inf:neg] = nan_pattern  # +inf and NaNs
    keys[neg + inf:] = nan_pattern
    for p in range(S):
        if not np.isnan(vals[p]):
            keys[bits[p] >> shift] = p
    keys[neg] = keys[0]  # -0
    return keys, bits


@njit(parallel=True, cache=True)
def f32_patterns(u, keys, shift, bits, out, inf_is_nan):
    """Patterns of float32 values given as their bits ``u`` (a flat uint32 array) by table
    look-up; returns how many are not values of the format. NaN is always accepted (its
    pattern is the format's NaN or NaR), an infinity that is no value only when the format
    reads it as NaN (``inf_is_nan``: posits' NaR)."""
    bad = 0
    for i in prange(u.size):
        x = u[i]
        p = keys[x >> shift]
        nan = ((x & 0x7F800000) == 0x7F800000) & ((x & 0x007FFFFF) != 0)
        inf = (x & 0x7FFFFFFF) == 0x7F800000
        ok = (bits[p] == x) | (x == 0x80000000) | nan | (inf & inf_is_nan)
        bad += 0 if ok else 1
        out[i] = p
    return bad


@njit(parallel=True, cache=True)
def lut_dot(A, B, acc0, mul, add, vals, out, n, nonfinite):
    """out[b, i, j] = acc; acc = acc0[b, j]; acc = add[acc, mul[A[b,i,k], B[b,k,j]]] over k.

    A (nb, M, K) and B (nb, K, N) are unsigned patterns. A zero a_k leaves every acc as it
    is unless row k of B holds a pattern with ``nonfinite[q]`` (NaR; a float's NaN or
    infinity): mul[0, q] is a zero otherwise, and adding a zero to an accumulator that
    started at +0 or a value other than -0 leaves it as it is.
    """
    nb, M, N = out.shape
    K = A.shape[2]
    S = 1 << n
    dirty = np.zeros((nb, K), dtype=np.bool_)
    for b in prange(nb):
        for k in range(K):
            d = False
            for j in range(N):
                d |= nonfinite[B[b, k, j]]
            dirty[b, k] = d
    CH = 32 if M >= 1024 else 1  # few rows (weight gradients): one per task, for the threads
    chunks = -(-M // CH)
    for c in prange(nb * chunks):
        b = c // chunks
        i0 = (c - b * chunks) * CH
        acc = np.empty(N, dtype=np.int64)
        for i in range(i0, min(i0 + CH, M)):
            for j in range(N):
                acc[j] = acc0[b, j]
            for k in range(K):
                pa = np.int64(A[b, i, k])
                if pa == 0 and not dirty[b, k]:
                    continue
                base = pa * S
                for j in range(N):
                    acc[j] = add[acc[j] * S + mul[base + B[b, k, j]]]
            for j in range(N):
                out[b, i, j] = vals[acc[j]]


@njit(parallel=True, cache=True)
def pattern_cols(x, kh, kw, sh, sw, ph, pw, dh, dw, out):
    """im2col on patterns: out[g, (i*ho + y)*wo + z, (c*kh + a)*kw + b] = x[i, g*cg + c,
    y*sh + a*dh - ph, z*sw + b*dw - pw], 0 (the zero pattern) outside x; out is
    (groups, n*ho*wo, cg*kh*kw), the column order of torch's unfold."""
    n, C, H, W = x.shape
    G, L, K = out.shape
    cg = C // G
    wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    for r in prange(n * ho):
        i = r // ho
        y = r - i * ho
        for g in range(G):
            for z in range(wo):
                row = (i * ho + y) * wo + z
                for c in range(cg):
                    for a in range(kh):
                        yy = y * sh + a * dh - ph
                        for b in range(kw):
                            zz = z * sw + b * dw - pw
                            inside = (yy >= 0) & (yy < H) & (zz >= 0) & (zz < W)
                            out[g, row, (c * kh + a) * kw + b] = x[i, g * cg + c, yy, zz] if inside else 0
