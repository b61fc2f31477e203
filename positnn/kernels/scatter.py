"""No-quire convolutions by scattering, without unfolding: every nonzero source element
(the input of a convolution, or the output error of its input gradient) is multiplied by
each kernel tap and added, both rounded, to the output it reaches.

Scanning the source's channels, rows and columns in ascending order hands every output
its terms in the order in which ``accumulate.sequential_dot`` adds the unfolded operands
(channel, then tap): for a convolution the source row grows with the tap's row, for the
transposed convolution of an input error it falls as the rotated tap's row grows. Zeros
(the source's, and the padding's and stride's, which are never visited) are skipped, as
``sequential_dot`` skips them, which only holds when the kernel has no NaR, NaN or
infinity: the callers unfold such kernels instead.
"""

import numpy as np
from numba import njit, prange

from .accumulate import round_fmt
from .rounding import round_value
from .arith import _product, two_sum


@njit(inline="always")
def _add_posit_products(t, s, row, rp):
    """t[j] = round(t[j] + round(s * row[j])) over j in a posit format: no branch on the
    format's kind in the loop, which then runs as SIMD."""
    for j in range(t.size):
        p, pe = _product(s, np.float64(row[j]))
        prod = round_value(p, pe, rp[1], rp[2], rp[6])
        total, err = two_sum(t[j], prod)
        t[j] = round_value(total, err, rp[1], rp[2], rp[6])


@njit(inline="always")
def _add_products(t, s, row, rp):
    """``_add_posit_products`` in any format."""
    if rp[0] == 0:
        _add_posit_products(t, s, row, rp)
        return
    for j in range(t.size):
        p, pe = _product(s, np.float64(row[j]))
        prod = round_fmt(p, pe, rp)
        total, err = two_sum(t[j], prod)
        t[j] = round_fmt(total, err, rp)


@njit(parallel=True, cache=True)
def scatter_dot(src, B, bias, ymap, xmap, out, rp):
    """src[i, g*Cg + c, u, v] (N, G*Cg, Hs, Ws) times B[g, c, a, b, j], each product rounded,
    is added with one rounding to out[i, ymap[u, a], xmap[v, b], g*Og + j] (a map of -1: no
    target), in the format ``rp``; out (N, Ho, Wo, G*Og) starts at the rounded bias (O,),
    or at 0 when bias is empty. Where all kw taps of a source column reach consecutive
    columns (no groups), their kw*Og terms are contiguous in both B and out: one loop."""
    N, _, Hs, Ws = src.shape
    G, Cg, kh, kw, Og = B.shape
    _, Ho, Wo, O = out.shape
    has_bias = bias.size > 0
    run = np.zeros(Ws, dtype=np.bool_)  # source column v reaches xmap[v, 0] + b under every tap b
    for v in range(Ws):
        ok = G == 1
        for b in range(kw):
            ok &= (xmap[v, 0] >= 0) & (xmap[v, b] == xmap[v, 0] + b)
        run[v] = ok
    for i in prange(N):
        acc = np.empty((Ho, Wo, O), dtype=np.float64)
        for j in range(O):
            acc[:, :, j] = round_fmt(np.float64(bias[j]), 0.0, rp) if has_bias else 0.0
        flat = acc.reshape(-1)
        for g in range(G):
            for c in range(Cg):
                for u in range(Hs):
                    for v in range(Ws):
                        s = np.float64(src[i, g * Cg + c, u, v])
                        if s == 0:
                            continue
                        for a in range(kh):
                            y = ymap[u, a]
                            if y < 0:
                                continue
                            if run[v]:
                                start = (y * Wo + xmap[v, 0]) * O
                                _add_products(flat[start:start + kw * O], s, B[g, c, a].reshape(-1), rp)
                                continue
                            for b in range(kw):
                                x = xmap[v, b]
                                if x >= 0:
                                    _add_products(acc[y, x, g * Og:(g + 1) * Og], s, B[g, c, a, b], rp)
        for y in range(Ho):
            for x in range(Wo):
                for j in range(O):
                    out[i, y, x, j] = acc[y, x, j]


@njit(parallel=True, cache=True)
def lut_scatter(src, B, acc0, ymap, xmap, mul, add, vals, out, n):
    """``scatter_dot`` on the n-bit patterns of src and B, one look-up in ``kernels.lut``'s
    tables for each product and each addition: the accumulators start at the patterns
    acc0 (G, Og), and out receives the values ``vals`` of the final patterns."""
    N, _, Hs, Ws = src.shape
    G, Cg, kh, kw, Og = B.shape
    _, Ho, Wo, O = out.shape
    S = 1 << n
    for i in prange(N):
        acc = np.empty((Ho, Wo, O), dtype=np.int64)
        for g in range(G):
            for j in range(Og):
                acc[:, :, g * Og + j] = acc0[g, j]
        for g in range(G):
            for c in range(Cg):
                for u in range(Hs):
                    for v in range(Ws):
                        base = np.int64(src[i, g * Cg + c, u, v]) * S
                        if base == 0:
                            continue
                        for a in range(kh):
                            y = ymap[u, a]
                            if y < 0:
                                continue
                            for b in range(kw):
                                x = xmap[v, b]
                                if x < 0:
                                    continue
                                row, t = B[g, c, a, b], acc[y, x, g * Og:(g + 1) * Og]
                                for j in range(Og):
                                    t[j] = add[t[j] * S + mul[base + row[j]]]
        for y in range(Ho):
            for x in range(Wo):
                for j in range(O):
                    out[i, y, x, j] = vals[acc[y, x, j]]
