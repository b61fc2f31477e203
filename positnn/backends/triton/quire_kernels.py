"""Triton kernels of the exact quire's device parts: span scans (``kernels.slicing``'s
``_top_low`` per row or over a whole tensor), error-free slicing (``_truncate_at``), and
the rounding of exact float64 results (``kernels.accumulate``'s ``round_sum``/``round_flat``
and ``round_value`` of a faithful value with the sign of its remainder)."""

import triton
import triton.language as tl

from .core import MANT_MASK, as_f64, as_i64, round_value, two_sum

NO_BITS = tl.constexpr(1 << 30)


@triton.jit
def top_low(v):
    """(e, l) with |v| < 2**e and v a multiple of 2**l; (-NO_BITS, NO_BITS) for 0 and NaR."""
    sub = tl.abs(v) < 2.2250738585072014e-308
    w = tl.where(sub, v * 18446744073709551616.0, v)
    shift = tl.where(sub, 64, 0).to(tl.int64)
    u = as_i64(w)
    biased = (u >> 52) & 0x7FF
    m = (u & MANT_MASK) | (1 << 52)
    tz = (as_i64((m & -m).to(tl.float64)) >> 52) - 1023
    ok = (biased > 0) & (biased < 0x7FF)
    return tl.where(ok, biased - 1022 - shift, -NO_BITS), tl.where(ok, biased - 1075 + tz - shift, NO_BITS)


@triton.jit
def scan_rows_kernel(x_ptr, top_ptr, low_ptr, copy_ptr, R, K, WRITE_COPY: tl.constexpr,
                     BR: tl.constexpr, BK: tl.constexpr):
    """Per row r of x (R, K): top[r], low[r] (``slicing.scan_rows``); optionally a float64 copy."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rmask = rows < R
    hi = tl.full([BR], -(1 << 30), tl.int64)
    lo = tl.full([BR], 1 << 30, tl.int64)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        m = rmask[:, None] & (cols[None, :] < K)
        idx = rows[:, None] * K + cols[None, :]
        v = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float64)
        if WRITE_COPY:
            tl.store(copy_ptr + idx, v, mask=m)
        t, b = top_low(v)
        hi = tl.maximum(hi, tl.max(t, axis=1))
        lo = tl.minimum(lo, tl.min(b, axis=1))
    tl.store(top_ptr + rows, hi, mask=rmask)
    tl.store(low_ptr + rows, lo, mask=rmask)


@triton.jit
def span_partials_kernel(x_ptr, top_ptr, low_ptr, bad_ptr, size, BLOCK: tl.constexpr):
    """One (top, low, nonfinite count) per block of a flat tensor (``slicing.global_span``)."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
    t, b = top_low(v)
    nonfinite = m & ((v != v) | (v == float("inf")) | (v == float("-inf")))
    tl.store(top_ptr + pid, tl.max(t, axis=0))
    tl.store(low_ptr + pid, tl.min(b, axis=0))
    tl.store(bad_ptr + pid, tl.sum(nonfinite.to(tl.int64), axis=0))


@triton.jit
def truncate_at(v, p):
    """v with every bit below 2**p cleared (exact; v finite and normal or zero)."""
    u = as_i64(v)
    e = ((u >> 52) & 0x7FF) - 1023
    keep = e - p + 1
    drop = tl.minimum(tl.maximum(53 - keep, 0), 53)
    one = tl.full(u.shape, 1, tl.int64)
    return as_f64(tl.where(drop < 53, u & ~((one << drop) - 1), u & (-9223372036854775807 - 1)))


@triton.jit
def split_rows_kernel(x_ptr, top_ptr, out_ptr, size, K, R, S, w, BLOCK: tl.constexpr):
    """out[b, s, r, :] = the bits of row (b, r) of x in [top - w(s+1), top - ws)
    (``slicing.split_rows``); x is (B*R, K) float64, out (B, S, R, K)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    row = offs // K
    k = offs - row * K
    b = row // R
    r = row - b * R
    t = tl.load(top_ptr + row, mask=m, other=0)
    rest = tl.load(x_ptr + offs, mask=m, other=0.0)
    finite = (rest == rest) & (rest != float("inf")) & (rest != float("-inf"))
    for s in range(S):
        cut = truncate_at(rest, t - w * (s + 1))
        val = tl.where(finite, cut, tl.where(s == 0, rest, 0.0))
        tl.store(out_ptr + ((b * S + s) * R + r) * K + k, val, mask=m)
        rest = tl.where(finite, rest - cut, rest)


@triton.jit
def round_sum_kernel(g_ptr, bias_ptr, out_ptr, size, stride, count, n: tl.constexpr, es: tl.constexpr,
                     underflow: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = round(g + bias[(i // stride) % count]) by TwoSum (``accumulate.round_sum``;
    without a bias, g + 0.0 as ``round_flat``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    if HAS_BIAS:
        bv = tl.load(bias_ptr + (offs // stride) % count, mask=m, other=0.0)
    else:
        bv = tl.zeros_like(g)
    s, err = two_sum(g, bv)
    tl.store(out_ptr + offs, round_value(s, err, n, es, underflow).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def round_value_kernel(h_ptr, t_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr,
                       underflow: tl.constexpr, BLOCK: tl.constexpr):
    """out = the posit nearest to h + (a value of t's sign), h faithful (``round_value``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    h = tl.load(h_ptr + offs, mask=m, other=0.0)
    t = tl.load(t_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, round_value(h, t, n, es, underflow).to(out_ptr.dtype.element_ty), mask=m)
