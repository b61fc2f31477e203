"""No-quire dot products of small posits (n <= 8) by table look-up on bit patterns.

``accumulate.sequential_dot`` rounds every product and every addition of float64 values.
For n <= 8 both operations are functions of two n-bit patterns, so they are tables of
2**(2n) patterns (64K entries for posit8), built once per (n, es, underflow) *with the
very same scalar code* (``_product``, ``two_sum``, ``round_value``): the look-up path is
bit-identical to the float path whenever every operand is a posit of the format.

Patterns are stored unsigned (the low n bits): 0 is zero, 2**(n-1) is NaR.
"""

import numpy as np
from numba import njit, prange

from .arith import _product, two_sum
from .rounding import decode, encode, round_value

_TABLES: dict = {}


@njit(cache=True)
def _build(vals, n, es, underflow, mul, add):
    S = 1 << n
    mask = S - 1
    x = np.empty(2 * S * S, dtype=np.float64)
    for p in range(S):
        for q in range(S):
            a = vals[p]
            b = vals[q]
            pr, pe = _product(a, b)
            x[p * S + q] = round_value(pr, pe, n, es, underflow)
            s, err = two_sum(a, b)
            x[S * S + p * S + q] = round_value(s, err, n, es, underflow)
    pats = np.empty(2 * S * S, dtype=np.int64)
    encode(x, pats, n, es)
    for i in range(S * S):
        mul[i] = pats[i] & mask
        add[i] = pats[S * S + i] & mask


def float32_keys(n: int, es: int):
    """(keys, bits): keys[u >> 16] is the pattern of the float32 whose bits are u, for every
    posit of the format (and both zeros; NaR for every inf and NaN), and bits[p] the float32
    bits of pattern p's value, to check that a looked-up value is that posit."""
    key = ("f32", n, es)
    if key not in _TABLES:
        S = 1 << n
        vals = np.empty(S, dtype=np.float64)
        decode(np.arange(S, dtype=np.int64), vals, n, es)
        bits = vals.astype(np.float32).view(np.uint32).copy()
        keys = np.zeros(1 << 16, dtype=np.uint8)
        keys[0x7F80:0x8000] = S >> 1  # +inf and NaNs
        keys[0xFF80:] = S >> 1
        for p in range(S):
            if p != S >> 1:
                keys[bits[p] >> 16] = p
        keys[0x8000] = 0  # -0
        _TABLES[key] = (keys, bits)
    return _TABLES[key]


@njit(parallel=True, cache=True)
def f32_patterns(u, keys, bits, out, n):
    """Patterns of float32 values given as their bits ``u`` (a flat uint32 array) by table
    look-up; returns how many are not posits of the format (n <= 8: at most 5 fraction
    bits, so the top 16 bits of a posit's float32 bits identify it)."""
    nar = 1 << (n - 1)
    bad = 0
    for i in prange(u.size):
        x = u[i]
        p = keys[x >> 16]
        nonfinite = (x & 0x7F800000) == 0x7F800000
        ok = (bits[p] == x) | (x == 0x80000000) | nonfinite
        bad += 0 if ok else 1
        out[i] = p
    return bad


def tables(n: int, es: int, underflow: bool):
    """(values, mul, add): values[p] of every unsigned pattern (NaR: NaN), and the
    flattened product and sum tables, mul[p * 2**n + q] = pattern of round(v_p * v_q)."""
    key = (n, es, bool(underflow))
    if key not in _TABLES:
        S = 1 << n
        vals = np.empty(S, dtype=np.float64)
        decode(np.arange(S, dtype=np.int64), vals, n, es)
        mul = np.empty(S * S, dtype=np.uint8)
        add = np.empty(S * S, dtype=np.uint8)
        _build(vals, n, es, bool(underflow), mul, add)
        _TABLES[key] = (vals, mul, add)
    return _TABLES[key]


@njit(parallel=True, cache=True)
def to_patterns(x, out, n, es):
    """Unsigned n-bit patterns of a flat array of posit values; returns how many entries
    are not posits of the format (then the patterns are meaningless)."""
    p = np.empty(x.size, dtype=np.int64)
    bad = encode(x, p, n, es)
    mask = (1 << n) - 1
    for i in prange(x.size):
        out[i] = p[i] & mask
    return bad


@njit(parallel=True, cache=True)
def lut_dot(A, B, acc0, mul, add, vals, out, n):
    """out[b, i, j] = acc; acc = acc0[b, j]; acc = add[acc, mul[A[b,i,k], B[b,k,j]]] over k.

    A (nb, M, K) and B (nb, K, N) are unsigned patterns. A zero a_k leaves every acc as it
    is unless row k of B holds NaR (mul[0, q] = 0 and add[p, 0] = p otherwise).
    """
    nb, M, N = out.shape
    K = A.shape[2]
    S = 1 << n
    nar = 1 << (n - 1)
    dirty = np.zeros((nb, K), dtype=np.bool_)
    for b in prange(nb):
        for k in range(K):
            d = False
            for j in range(N):
                d |= B[b, k, j] == nar
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
