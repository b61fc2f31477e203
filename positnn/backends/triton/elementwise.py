"""Triton element-wise kernels: rounding (nearest, stochastic), encode, decode and the
correctly rounded add, mul, div, sqrt and fma, one program per block of a flat tensor.

Each kernel reads its operands in their own dtype, computes in float64 bit patterns as
``positnn.kernels`` does, and stores in the output's dtype. As their numba twins.
"""

import triton
import triton.language as tl

from .core import EXP_INF, MANT_MASK, NAN_BITS, as_f64, as_i64, fma_parts, product, quotient, round_abs, round_value, two_sum


@triton.jit
def round_nearest_kernel(x_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, underflow: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
    r = round_value(x, tl.zeros_like(x), n, es, underflow)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def round_stochastic_kernel(x_ptr, rand_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr,
                            underflow: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64)
    rnd = tl.load(rand_ptr + offs, mask=m, other=0.0).to(tl.float64)
    u = as_i64(v)
    a = u & 0x7FFFFFFFFFFFFFFF
    lo, hi, up = round_abs(a, a * 0, n, es, underflow)
    flo = as_f64(lo)
    fhi = as_f64(hi)
    span = fhi - flo
    p = tl.where(span > 0, (tl.abs(v) - flo) / tl.where(span > 0, span, 1.0), 0.0)
    if not underflow:
        p = tl.where(lo == 0, 1.0, p)
    r = tl.where(rnd < p, hi, lo) | (u & (-9223372036854775807 - 1))
    r = tl.where(a != 0, r, u)
    r = tl.where(a < EXP_INF, r, NAN_BITS)
    tl.store(out_ptr + offs, as_f64(r).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def encode_kernel(x_ptr, out_ptr, bad_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    """Bit patterns; adds the count of inputs that are not posits to ``bad_ptr[0]``."""
    maxexp: tl.constexpr = (n - 2) << es
    nar: tl.constexpr = -(1 << (n - 1))
    maxpat: tl.constexpr = (1 << (n - 1)) - 1
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    u = as_i64(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float64))
    one = tl.full(u.shape, 1, tl.int64)
    a = u & 0x7FFFFFFFFFFFFFFF
    E = (a >> 52) - 1023
    k = E >> es
    k = tl.minimum(tl.maximum(k, -40), 40)
    rlen = tl.where(k >= 0, k + 2, 1 - k)
    avail = tl.minimum(tl.maximum(n - 1 - rlen, 0), 31)
    regime = tl.where(k >= 0, ((one << (k + 1)) - 1) << 1, 1)
    regime = tl.where(k < n - 2, regime, maxpat)
    tail = ((E - (k << es)) << 52) | (a & MANT_MASK)
    drop = 52 + es - avail
    p = (regime << avail) | (tail >> drop)
    ok = ((tail & ((one << drop) - 1)) == 0) | (k == n - 2)
    ok = ok & (E >= -maxexp) & (E <= maxexp) & (((a & MANT_MASK) == 0) | (E < maxexp))
    p = tl.where(u < 0, -p, p)
    p = tl.where(a == 0, 0, p)
    p = tl.where(a >= EXP_INF, nar, p)
    nonposit = (a != 0) & (a < EXP_INF) & ~ok & m
    tl.atomic_add(bad_ptr, tl.sum(nonposit.to(tl.int64), axis=0))
    tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def decode_kernel(bits_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    mask: tl.constexpr = (1 << (n - 1)) - 1
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    p = (tl.load(bits_ptr + offs, mask=m, other=0).to(tl.int64) << (64 - n)) >> (64 - n)
    one = tl.full(p.shape, 1, tl.int64)
    a = tl.where(p < 0, -p, p)
    top = (a >> (n - 2)) & 1
    y = tl.where(top == 1, ~a & mask, a)
    # bit length of 0 <= y < 2**53 through the float64 exponent, as the numba kernel
    blen = tl.where(y > 0, (as_i64(y.to(tl.float64)) >> 52) - 1022, 0)
    run = (n - 1) - blen
    k = tl.where(top == 1, run - 1, -run)
    rem = tl.maximum(n - 2 - run, 0)
    tail = a & ((one << rem) - 1)
    fb = tl.maximum(rem - es, 0)
    e = tl.where(rem >= es, tail >> fb, tail << tl.maximum(es - rem, 0))
    frac = tail & ((one << fb) - 1)
    r = (((k << es) + e + 1023) << 52) | (frac << (52 - fb))
    r = tl.where(p < 0, r | (-9223372036854775807 - 1), r)
    r = tl.where(p == 0, 0, r)
    r = tl.where(p == -(1 << (n - 1)), NAN_BITS, r)
    tl.store(out_ptr + offs, as_f64(r).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def add_kernel(a_ptr, b_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float64)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float64)
    s, t = two_sum(a, b)
    tl.store(out_ptr + offs, round_value(s, t, n, es, False).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def mul_kernel(a_ptr, b_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float64)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float64)
    p, e = product(a, b)
    tl.store(out_ptr + offs, round_value(p, e, n, es, False).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def div_kernel(a_ptr, b_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    x = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float64)
    y = tl.load(b_ptr + offs, mask=m, other=1.0).to(tl.float64)
    q, t = quotient(x, tl.where(y == 0, 1.0, y))
    q = tl.where(y == 0, float("nan"), q)
    tl.store(out_ptr + offs, round_value(q, t, n, es, False).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def sqrt_kernel(a_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    x = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float64)
    q = tl.where(x >= 0, tl.sqrt(tl.where(x >= 0, x, 0.0)), float("nan"))
    r = tl.fma(-q, q, x)
    tl.store(out_ptr + offs, round_value(q, r, n, es, False).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def fma_kernel(a_ptr, b_ptr, c_ptr, out_ptr, size, n: tl.constexpr, es: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < size
    a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float64)
    b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float64)
    c = tl.load(c_ptr + offs, mask=m, other=0.0).to(tl.float64)
    h, rest = fma_parts(a, b, c)
    tl.store(out_ptr + offs, round_value(h, rest, n, es, False).to(out_ptr.dtype.element_ty), mask=m)
