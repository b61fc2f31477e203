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
    """out[b, i, j] = acc; acc = acc0[j]; acc = add[acc, mul[A[b,i,k], B[b,k,j]]] over k.

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
    CH = 32
    chunks = -(-M // CH)
    for c in prange(nb * chunks):
        b = c // chunks
        i0 = (c - b * chunks) * CH
        acc = np.empty(N, dtype=np.int64)
        for i in range(i0, min(i0 + CH, M)):
            for j in range(N):
                acc[j] = acc0[j]
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
def lut_dot4(A, B, acc0, mul, add, vals, out, n):
    """As lut_dot, four rows of A at a time (four independent chains per column)."""
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
    blocks = -(-M // 4)
    for c in prange(nb * blocks):
        b = c // blocks
        i0 = (c - b * blocks) * 4
        acc = np.empty((4, N), dtype=np.int64)
        for r in range(4):
            for j in range(N):
                acc[r, j] = acc0[j]
        i1, i2, i3 = min(i0 + 1, M - 1), min(i0 + 2, M - 1), min(i0 + 3, M - 1)
        for k in range(K):
            p0 = np.int64(A[b, i0, k])
            p1 = np.int64(A[b, i1, k])
            p2 = np.int64(A[b, i2, k])
            p3 = np.int64(A[b, i3, k])
            if (p0 | p1 | p2 | p3) == 0 and not dirty[b, k]:
                continue
            p0 *= S
            p1 *= S
            p2 *= S
            p3 *= S
            for j in range(N):
                q = np.int64(B[b, k, j])
                acc[0, j] = add[acc[0, j] * S + mul[p0 + q]]
                acc[1, j] = add[acc[1, j] * S + mul[p1 + q]]
                acc[2, j] = add[acc[2, j] * S + mul[p2 + q]]
                acc[3, j] = add[acc[3, j] * S + mul[p3 + q]]
        for r in range(min(4, M - i0)):
            for j in range(N):
                out[b, i0 + r, j] = vals[acc[r, j]]
