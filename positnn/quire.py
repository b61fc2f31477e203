"""Exact accumulation (the quire): dot products, matmul, linear, conv2d and sum, rounded once.

The format is a parameter: a ``Posit`` or a binary ``Float`` (fp8, fp16, bf16, eXmY; a
Kulisch accumulator for floats). Every posit is an integer multiple of minpos, and every
float one of its smallest subnormal, so a dot product of either is an integer sum. ``mode="exact"`` computes it at BLAS speed (Ozaki slicing): each row of ``a``
and column of ``b`` is split, without error, into slices of ``w`` bits relative to its own
largest exponent, with ``2w + ceil(log2 K) <= 53``; every slice GEMM in float64 is then an
exact integer, whatever order BLAS adds in. The slice products (and the bias) are summed
exactly in multi-limb integers and rounded once. Results are bit-identical for any thread
count, BLAS or batch split, and exact for any K: wider than the 2022 standard quire, which
guarantees 2**31 products, so there is no overflow case.

Other modes, named as PositNN and its peers name them:
- ``"none"``: no quire; each product is rounded, then each addition, in order over K
  (PositNN QUIRE_MODE 0). The bias, if any, is the initial accumulator.
- ``"float32"`` / ``"float64"``: accumulate in that float, round once. Approximations,
  kept for comparison with frameworks that simulate posits this way. Products beyond the
  float's range are scaled by exact powers of two instead of overflowing to inf (NaR) or
  flushing to 0, so results saturate at maxpos and minpos as posits do.

The one rounding is the format's own (``kernels.accumulate.round_fmt``): posits saturate;
floats follow their preset (fp8e4m3 saturates at 448, the IEEE-like formats round to +-inf
past max + ulp/2, as ``Float.round``). An exact zero sum is +0.

Inputs are taken as exact real values (posits of any format, or any floats); for posits
NaN and +-inf are NaR and make every output they touch NaR; for floats every output a NaN
or an infinity touches is NaN or the infinity float64 arithmetic gives (inf + 1 = inf;
fp8e4m3, which has no infinity, saturates it to +-448 as its ``round`` does), not always
IEEE's verdict. Exact mode raises ValueError when products
would leave float64's range (below 2**-1074 or above 2**1020 / K), which posits of every
format with max_exponent <= 500, and floats of at most 9 exponent bits, never do.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .backends import backend_for
from .floatformat import Float
from . import lookup, scatter
from .format import Posit, check_rounding_options
from .kernels import accumulate as acc
from .kernels import slicing

MODES = ("exact", "none", "float32", "float64")
NumberFormat = Posit | Float
# The largest limb magnitude a loaded quire state may hold: the sum of up to 2**28 quires'
# digits, far from int64 overflow when the kernels add 2**40-sized chunks and carry.
LIMB_BOUND = 1 << 48
_NO_EXP = slicing.NO_BITS  # "exponent" of an all-zero row
_DBL_MAX, _DBL_TRUE_MIN = float(np.finfo(np.float64).max), 2.0**-1074
# Exact mode computes in float64, so every product must lie within its range: the lowest
# bits of a and b may add up to no less than 2**-1074, their tops to at most 2**1020 / K.
# Posits of every format with max_exponent <= 500 (all es <= 4; es = 5 up to 17 bits) fit,
# and floats with at most 9 exponent bits (fp8, fp16, bf16, fp32: products >= 2**-298).
LOWEST_BIT, HIGHEST_BIT = -1074, 1020


def _products_fit(ta: int, la: int, tb: int, lb: int, terms: int) -> bool:
    return la + lb >= LOWEST_BIT and ta + tb + math.ceil(math.log2(max(terms, 1))) <= HIGHEST_BIT


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quire mode must be one of {MODES}, got {mode!r}")


def _check_operand(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    return x


def _scan(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, int]]:
    """Rows of x (B, R, K) as float64, their top exponents, the widest row span in bits,
    and (highest top, lowest bit) over all rows."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    be = backend_for(x.device)
    copy, top, low = be.scan_rows(flat)
    hi, lo, span = be.row_extent(top, low)
    if span < 0:  # no nonzero finite entry
        return copy.view(x.shape), top, 0, (0, 0)
    return copy.view(x.shape), top, span, (hi, lo)


def _widths(span_a: int, span_b: int, budget: int, size_a: int = 1, size_b: int = 1, outputs: int = 1) -> tuple[int, int]:
    """Slice widths (wa, wb) with wa + wb <= budget bits, for the least work.

    The work counted: writing the slices of whichever operand is sliced (size_a, size_b
    elements), the slice GEMMs (cheap per element), and the exact recombination of
    several slice products per output.
    """
    if span_a + span_b <= budget:
        return max(span_a, 1), max(span_b, 1)
    best = None
    for wa in range(1, budget):
        P, Q = -(-span_a // wa), -(-span_b // (budget - wa))
        work = (P > 1) * P * size_a + (Q > 1) * Q * size_b + P * Q * outputs * (1 + 8 * (P * Q > 1))
        if best is None or work < best[0]:
            best = (work, wa, budget - wa)
    return best[1], best[2]


def _slices(x: torch.Tensor, top: torch.Tensor, span: int, w: int) -> torch.Tensor:
    """x (B, R, K) float64 as exact slices (B, S*R, K) of at most w bits below each row's top."""
    S = max(1, -(-span // w))
    if S == 1:
        return x
    nb, R, K = x.shape
    out = backend_for(x.device).split_rows(x.reshape(-1, K), top, w, (nb, S, R, K))
    return out.view(nb, S * R, K)


def _exact_bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, fmt: NumberFormat, underflow: bool) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) + bias (N,), exact, rounded once.

    A float64 GEMM is exact when every row of a spans sa bits, every column of b spans sb
    bits and sa + sb + ceil(log2 K) <= 53: all partial sums are then multiples of the
    smallest product unit below 2**53 of them. Wider operands are sliced to fit.
    """
    nb, M, K = a.shape
    N = b.shape[-1]
    a64, top_a, span_a, (ta, la) = _scan(a)
    bt64, top_b, span_b, (tb, lb) = _scan(b.transpose(-1, -2))
    if not _products_fit(ta, la, tb, lb, K):
        raise ValueError(
            f"the exact quire works in float64, but products of these operands span 2**{la + lb} to 2**{ta + tb} "
            f"(K = {K}), beyond [2**{LOWEST_BIT}, 2**{HIGHEST_BIT}]; posits of formats with max_exponent <= 500 and floats with at most 9 exponent bits always fit"
        )
    wa, wb = _widths(span_a, span_b, 53 - math.ceil(math.log2(max(K, 1))), a.numel(), b.numel(), nb * M * N)
    lhs = _slices(a64, top_a, span_a, wa)  # (B, P*M, K)
    rhs = _slices(bt64, top_b, span_b, wb)  # (B, Q*N, K)
    P, Q = lhs.shape[1] // M, rhs.shape[1] // N
    G = torch.matmul(lhs, rhs.transpose(-1, -2))
    be = backend_for(G.device)
    bias_v = None if bias is None else bias.reshape(N).contiguous()
    if P == Q == 1 and bias is None:
        return be.round_flat(G, fmt, underflow)
    if P == Q == 1:
        return be.round_sum(G, bias_v, False, fmt, underflow)
    return be.round_terms(G, P, Q, bias_v, fmt, underflow)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: NumberFormat,
    *,
    bias: torch.Tensor | None = None,
    mode: str = "exact",
    underflow: bool = False,
) -> torch.Tensor:
    """a @ b (+ bias, added inside the accumulator), rounded once to ``fmt``.

    Batched with torch.matmul's broadcasting rules; ``bias`` has shape (N,). Returns a
    tensor of ``fmt.dtype`` on a's device. See the module docstring for the modes.
    """
    _check_mode(mode)
    check_rounding_options(underflow=underflow)
    _check_operand(a, "a")
    _check_operand(b, "b")
    if bias is not None:
        _check_operand(bias, "bias")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul operands must have at least one dimension")
    device = a.device
    squeeze_rows, squeeze_cols = a.dim() == 1, b.dim() == 1
    a2 = a.unsqueeze(0) if squeeze_rows else a
    b2 = b.unsqueeze(-1) if squeeze_cols else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul shapes {tuple(a.shape)} and {tuple(b.shape)} do not match in the reduced dimension")
    N = b2.shape[-1]
    if bias is not None and bias.numel() != N:
        raise ValueError(f"bias must have {N} elements (one per output column), got shape {tuple(bias.shape)}")
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    M, K = a2.shape[-2:]
    if K == 0 or M == 0 or N == 0 or math.prod(batch) == 0:  # an empty sum is 0 (plus the bias)
        out = torch.zeros((*batch, M, N), dtype=fmt.dtype)
        if bias is not None:
            out = out + fmt.round(bias.detach().cpu().reshape(N))
        return _squeeze(out, squeeze_rows, squeeze_cols).to(device)
    keep = _operand if mode == "exact" else _host  # the exact quire runs where its backend does
    a3 = keep(a2).expand(*batch, M, K).reshape(-1, M, K)
    b3 = keep(b2).expand(*batch, K, N).reshape(-1, K, N)
    bias64 = None if bias is None else keep(bias).double().reshape(N)

    if mode == "exact":
        out = _exact_bmm(a3, b3, bias64, fmt, underflow)
    elif mode == "none":
        out = lookup.bmm(a3, b3, bias64, fmt, underflow)
        if out is not None:
            return _squeeze(out.reshape(*batch, M, N), squeeze_rows, squeeze_cols).to(device)
        out = torch.empty((a3.shape[0], M, N), dtype=fmt.dtype)
        no_bias = torch.empty(0, dtype=torch.float64)
        acc.sequential_dot(
            a3.contiguous().numpy(), b3.contiguous().numpy(),
            (no_bias if bias64 is None else bias64).contiguous().numpy(), out.numpy(), fmt._accumulate_params(underflow),
        )
    else:
        out = _float_bmm(a3, b3, bias64, fmt, underflow, torch.float32 if mode == "float32" else torch.float64)

    return _squeeze(out.reshape(*batch, M, N), squeeze_rows, squeeze_cols).to(device)


def _exponents(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, hi): frexp exponents of x (2**(e-1) <= |v| < 2**e), and their max along ``dim``
    (kept) over the finite nonzero entries, -_NO_EXP where there are none (NaR entries
    propagate by themselves)."""
    e = torch.frexp(x).exponent.to(torch.int64)
    live = torch.isfinite(x) & (x != 0)
    return e, torch.where(live, e, -_NO_EXP).amax(dim, keepdim=True)


def _float_bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, fmt: NumberFormat, underflow: bool, dt: torch.dtype) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) + bias accumulated in float ``dt``, rounded once.

    As a float GEMM with an unbounded exponent: posits saturate, so a product beyond the
    float's range must give maxpos, not inf (NaR), and one below it minpos, not 0.
    - Every operand and product within dt's normal range: the plain GEMM, as is, unless a
      partial sum overflowed (an inf or NaN from finite inputs).
    - Otherwise each row of a and column of b is cut into bands of W binades below its
      top, each band scaled by a power of two to a top of 1 (exact) so that products of
      two bands stay normal in dt. One dt GEMM multiplies every band pair; the pairs are
      summed in float64 relative to the largest and scaled back, saturating where float64
      ends (every posit does too, well inside it). Rows and columns within W binades give
      one band: the plain GEMM of the scaled operands.
    """
    info = np.finfo(np.float32 if dt == torch.float32 else np.float64)
    emin, emax = int(info.minexp), int(info.maxexp)  # normal |v| in [2**emin, 2**emax)
    # One pass per operand: 2**(lo - 1) <= |v| < 2**hi over the whole tensor.
    (hi_a, lo_a, bad_a), (hi_b, lo_b, bad_b) = (slicing.magnitude_range(_host(t).reshape(-1).contiguous().numpy()) for t in (a, b))
    hc, lc, bad_c = (-_NO_EXP, _NO_EXP, 0) if bias is None else slicing.magnitude_range(bias.contiguous().numpy())
    if min(lo_a - 1, lo_b - 1, lo_a + lo_b - 2, lc - 1) >= emin and max(hi_a, hi_b, hi_a + hi_b, hc) < emax:
        y = torch.matmul(a.to(dt), b.to(dt))
        if bias is not None:
            y = y + bias.to(dt)
        # Partial sums may still overflow (a tight bound up front would refuse too much):
        # an inf or NaN that no NaR input explains.
        if bool(torch.isfinite(y).all()):
            return fmt.round(y, underflow=underflow)
        if bad_a or bad_b or bad_c:
            finite_in = torch.isfinite(a).all(-1, keepdim=True) & torch.isfinite(b).all(-2, keepdim=True)
            if bias is not None:
                finite_in = finite_in & torch.isfinite(bias)
            if not bool((~torch.isfinite(y) & finite_in).any()):
                return fmt.round(y, underflow=underflow)
    bt = b.transpose(-1, -2)
    ea, ha = _exponents(a, -1)  # (B, M, K), (B, M, 1)
    eb, hb = _exponents(bt, -1)  # (B, N, K), (B, N, 1)
    W = (-emin - 2) // 2  # band entries in [2**-W, 1): products >= 2**(emin + 2)
    lhs, sa = _bands(a.double(), ea, ha, W)  # (B, P*M, K), (B, P, M)
    rhs, sb = _bands(bt.double(), eb, hb, W)  # (B, Q*N, K), (B, Q, N)
    nb, P, M = sa.shape
    Q, N = sb.shape[1:]
    G = torch.matmul(lhs.to(dt), rhs.to(dt).transpose(-1, -2)).double().view(nb, P, M, Q, N)
    scale = sa[:, :, :, None, None] + sb[:, None, None, :, :]  # (B, P, M, Q, N)
    # Sum the band pairs relative to the largest nonzero one: no overflow, and whatever
    # underflows is below 2**-1000 of it.
    top = torch.where(G != 0, scale, -_NO_EXP).amax(dim=(1, 3))  # (B, M, N)
    top = torch.where(top > -_NO_EXP, top, 0)
    rel = (scale - top[:, None, :, None, :]).clamp_min(-4096)  # 2**-4096: 0 in float64 anyway
    with np.errstate(under="ignore"):
        z = torch.from_numpy(np.ldexp(G.numpy(), rel.numpy().astype(np.int32))).sum(dim=(1, 3))
    z = _ldexp(z, top)
    if bias is not None:  # in float64, where z may lie beyond dt's range
        z = _saturate(z + bias, z, keep_zero=True)
    return fmt.round(z, underflow=underflow)


def _bands(x: torch.Tensor, e: torch.Tensor, hi: torch.Tensor, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (B, R, K) cut into P bands of W binades below each row's top ``hi``:
    (bands (B, P*R, K), scales (B, P, R)) with x[b, r] = sum_p bands[b, pR + r] * 2**scales[b, p, r].

    Band p holds the entries with exponent in (hi - (p+1)W, hi - pW], scaled into
    [2**-W, 1); the rest of the band is 0. NaR entries stay, unscaled, in band 0.
    """
    live = torch.isfinite(x) & (x != 0)
    top = torch.where(hi > -_NO_EXP, hi, 0)  # (B, R, 1)
    band = torch.where(live, (top - e) // W, 0)
    P = int(band.max()) + 1 if band.numel() else 1
    shift = top - band * W
    scaled = torch.where(live, _ldexp(x, -shift), x)
    out = torch.zeros((P, *x.shape), dtype=torch.float64)
    out.scatter_(0, band.unsqueeze(0), scaled.unsqueeze(0))
    nb, R, K = x.shape
    scales = (top.squeeze(-1).unsqueeze(1) - W * torch.arange(P).view(1, P, 1))  # (B, P, R)
    return out.permute(1, 0, 2, 3).reshape(nb, P * R, K), scales


def _ldexp(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """x * 2**e in float64 (e broadcast), exact where the result is normal, saturating to
    +-DBL_MAX and +-the smallest subnormal instead of overflowing to inf or flushing to 0."""
    with np.errstate(over="ignore", under="ignore"):  # saturated below
        z = np.ldexp(x.numpy(), torch.broadcast_to(e, x.shape).numpy().astype(np.int32))
    return _saturate(torch.from_numpy(z), x)


def _saturate(z: torch.Tensor, x: torch.Tensor, keep_zero: bool = False) -> torch.Tensor:
    """z computed from x: an inf where x is finite becomes +-DBL_MAX and (unless
    ``keep_zero``, for sums that may cancel exactly) a 0 where x is not becomes +-2**-1074."""
    z = torch.where(torch.isinf(z) & torch.isfinite(x), torch.copysign(torch.tensor(_DBL_MAX, dtype=torch.float64), z), z)
    if keep_zero:
        return z
    return torch.where((z == 0) & (x != 0), torch.copysign(torch.tensor(_DBL_TRUE_MIN, dtype=torch.float64), x), z)


def _squeeze(out: torch.Tensor, rows: bool, cols: bool) -> torch.Tensor:
    """Undo the unsqueezing of 1-D matmul operands."""
    if rows:
        out = out.squeeze(-2)
    return out.squeeze(-1) if cols else out


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: NumberFormat, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """x @ w.T + bias with x (..., in) and w (out, in), accumulated in one quire per output."""
    return matmul(x, w.transpose(0, 1), fmt, bias=bias, mode=mode, underflow=underflow)


def dot(a: torch.Tensor, b: torch.Tensor, fmt: NumberFormat, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """The dot product of two 1-D tensors, rounded once (a 0-dim tensor)."""
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(f"dot expects 1-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return matmul(a, b, fmt, mode=mode, underflow=underflow)


def sum(x: torch.Tensor, dim: int, fmt: NumberFormat, keepdim: bool = False, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """The sum of x along ``dim``, accumulated exactly and rounded once."""
    _check_operand(x, "x")
    moved = x.movedim(dim, -1)
    out = _float64_sum(moved, fmt, underflow) if mode == "exact" else None
    if out is None:
        ones = torch.ones(moved.shape[-1], 1, dtype=torch.float64)
        out = matmul(moved, ones, fmt, mode=mode, underflow=underflow).squeeze(-1)
    return out.unsqueeze(dim) if keepdim else out


def _float64_sum(x: torch.Tensor, fmt: NumberFormat, underflow: bool) -> torch.Tensor | None:
    """x summed over its last dim by torch in float64 and rounded once, where that sum is
    exact in any order: span(x) + ceil(log2 K) <= 53 bits over the whole tensor (every
    partial sum is then an integer below 2**53 in units of x's lowest bit). None where it
    is not, or for NaN or infinite entries: the quire's GEMM path takes those."""
    if x.dim() < 1 or x.numel() == 0:
        return None
    K = x.shape[-1]
    top, low, bad = backend_for(x.device).global_span(_operand(x))
    headroom = math.ceil(math.log2(K))
    if bad or (top - low) + headroom > 53 or top + headroom > HIGHEST_BIT:
        return None
    s = _operand(x).to(torch.float64).sum(-1).add_(0.0)  # + 0.0: a sum of -0s is +0, as in the quire
    return backend_for(s.device).round_flat(s.reshape(1, -1, 1), fmt, underflow).view(x.shape[:-1]).to(x.device)


def _host(x: torch.Tensor) -> torch.Tensor:
    """x on the CPU as float32 or float64 (both exact for the kernels)."""
    x = x.detach().cpu()
    return x if x.dtype in (torch.float32, torch.float64) else x.double()


def _operand(x: torch.Tensor) -> torch.Tensor:
    """x as float32 or float64 where the exact quire's backend for its device computes:
    on that device for a device-resident backend (Triton), else on the host."""
    if not getattr(backend_for(x.device), "DEVICE_RESIDENT", False):
        return _host(x)
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.double()


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# A sliced native convolution runs P * Q float64 convolutions; beyond this many the unfolded
# GEMM with per-row slicing (narrower spans) is the better plan.
MAX_NATIVE_SLICES = 6
# torch's float32 convolutions (oneDNN) ran 1.5-19x faster than its float64 ones on LeNet-5
# and ResNet-20 shapes here for the forward, 0.7-17x for the weight gradient, 2-10x for the
# input gradient with 6 or more input channels and 0.1-0.4x with one
# (benchmarks/bench_conv_dtypes.py). A float32 plan is taken when it needs at most this
# many times the float64 plan's slice pairs, and at most MAX_FLOAT32_SLICES: each pair also
# costs a slice pass, a conversion and an addition, and on ResNet-20 an advantage of 8 was
# slower than 4.
FLOAT32_ADVANTAGE, INPUT_GRAD_ADVANTAGE = 4, 2
MAX_FLOAT32_SLICES = 8
# float32 slices and their products must stay normal floats (no subnormal, no flush to
# zero, no overflow), so every partial sum is exact.
F32_LOWEST, F32_HIGHEST = -126, 127


def _slice_plan(ta: int, la: int, tb: int, lb: int, terms: int, mantissa: int, sizes: tuple[int, int]):
    """(P, Q, wa, wb) with wa + wb + ceil(log2 terms) <= ``mantissa`` bits, or None."""
    budget = mantissa - math.ceil(math.log2(max(terms, 1)))
    sa, sb = ta - la, tb - lb
    if sa + sb <= budget:
        return 1, 1, sa, sb
    if budget < 2:
        return None
    wa, wb = _widths(sa, sb, budget, sizes[0], sizes[1], max(sizes))
    return -(-sa // wa), -(-sb // wb), wa, wb


def _fits_float32(ta: int, la: int, tb: int, lb: int, terms: int) -> bool:
    """Whether every operand bit, product and partial sum lies in float32's normal range."""
    top = max(ta, tb, ta + tb + math.ceil(math.log2(max(terms, 1))))
    return min(la, lb, la + lb) >= F32_LOWEST and top <= F32_HIGHEST


class NativePlan(NamedTuple):
    """P x Q slice pairs of wa and wb bits below 2**ta and 2**tb, convolved in ``dtype``;
    ``sum64``: their results add up exactly in float64 (no limbs needed)."""

    P: int
    Q: int
    wa: int
    wb: int
    ta: int
    tb: int
    dtype: torch.dtype
    sum64: bool


def _native_plan(a: torch.Tensor, b: torch.Tensor, terms: int,
                 float32_advantage: int = FLOAT32_ADVANTAGE) -> NativePlan | None:
    """How a float torch op summing ``terms`` products of entries of a and b is exact: a
    :class:`NativePlan`, or None where it cannot be (the unfolded GEMM path then).

    One op in a dtype with an m-bit significand (53 for float64, 24 for float32) is exact
    when span(a) + span(b) + ceil(log2 terms) <= m over the whole tensors: every partial
    sum, in any order, is then a multiple of the smallest product unit below 2**m of them
    (P = Q = 1). Wider operands are cut, without error, into P (Q) slices of wa (wb) bits
    below the tensor's top ta (tb), wa + wb + ceil(log2 terms) <= m, so each of the P * Q
    slice-pair ops is exact; their results are summed in limbs. float32 is used when its
    plan needs at most ``float32_advantage`` times the float64 plan's slice pairs (0: never)
    and every slice product and sum stays a normal float32. NaR gives None (the slower path
    keeps NaR where it belongs).
    """
    ta, la, bad_a = backend_for(a.device).global_span(_operand(a))
    tb, lb, bad_b = backend_for(b.device).global_span(_operand(b))
    if bad_a or bad_b:
        return None
    if la == slicing.NO_BITS or lb == slicing.NO_BITS:
        return NativePlan(1, 1, 0, 0, 0, 0, torch.float64, True)  # an all-zero operand
    if not _products_fit(ta, la, tb, lb, terms):
        return None
    sizes = (a.numel(), b.numel())
    p64 = _slice_plan(ta, la, tb, lb, terms, 53, sizes)
    if p64 is not None and p64[0] * p64[1] > 1 and min(la, lb) < -1022:  # slicing clears mantissa bits of normal floats
        p64 = None
    if float32_advantage and _fits_float32(ta, la, tb, lb, terms) and _float32_is_ieee():
        p32 = _slice_plan(ta, la, tb, lb, terms, 24, sizes)
        # the float64 alternative: its slice pairs, or the unfolded GEMM where there is none
        pairs64 = MAX_NATIVE_SLICES if p64 is None else min(p64[0] * p64[1], MAX_NATIVE_SLICES)
        if p32 is not None and p32[0] * p32[1] <= min(float32_advantage * pairs64, MAX_FLOAT32_SLICES):
            # every partial sum of the pairs' results is below P*Q*terms products' top
            sum64 = (ta - la) + (tb - lb) + math.ceil(math.log2(max(terms, 1) * p32[0] * p32[1])) <= 53
            return NativePlan(*p32, ta, tb, torch.float32, sum64)
    if p64 is None or p64[0] * p64[1] > MAX_NATIVE_SLICES:
        return None
    return NativePlan(*p64, ta, tb, torch.float64, p64[0] * p64[1] == 1)


def _whole_window(x_shape, w_shape, stride, padding, dilation, groups) -> bool:
    """Does every kernel cover its whole input (a 1x1 output, no padding, one group)? The
    convolution is then a plain GEMM, which BLAS does faster than torch's float64 conv."""
    return (groups == 1 and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)
            and tuple(x_shape[2:]) == tuple(w_shape[2:]))


def _native_slices(x: torch.Tensor, count: int, w: int, top: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """x in ``dtype``, or as ``count`` exact slices of w bits below 2**top summing to it
    (each slice exact in ``dtype``, as the plan guarantees)."""
    x = _operand(x)
    if count == 1:
        return [x.to(dtype)]
    out = backend_for(x.device).split_flat(x, top, w, count, dtype)
    return list(out.view(count, *x.shape).unbind(0))


def _float32_is_ieee() -> bool:
    """Whether torch's float32 convolutions and matmuls are IEEE float32 here (not TF32 or
    bfloat16, which a user can ask oneDNN for); float32 plans need that."""
    ieee = ("none", "ieee")
    return (torch.get_float32_matmul_precision() == "highest" and torch.backends.mkldnn.conv.fp32_precision in ieee
            and torch.backends.mkldnn.matmul.fp32_precision in ieee)


def _native_op(op, a: torch.Tensor, b: torch.Tensor, plan, fmt: NumberFormat, underflow: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """op(a, b) (a torch convolution) exactly per ``plan``, plus a per-channel bias,
    rounded once: (N, C, H, W) in ``fmt.dtype``."""
    sa = _native_slices(a, plan.P, plan.wa, plan.ta, plan.dtype)
    sb = _native_slices(b, plan.Q, plan.wb, plan.tb, plan.dtype)
    with torch.backends.nnpack.flags(enabled=False):  # its Winograd and FFT transforms round
        if plan.sum64:
            y = None
            for u in sa:
                for v in sb:
                    z = op(u, v).double()
                    y = z if y is None else y.add_(z)
            return _round_exact(y, fmt, underflow, bias)
        ys = [op(u, v).double() for u in sa for v in sb]
    y = torch.stack(ys)  # (T, N, C, H, W)
    t, n, c = y.shape[:3]
    g = y.reshape(t, n, c, -1).contiguous()
    bias_v = None if bias is None else _operand(bias).double().reshape(c)
    return backend_for(g.device).round_stack(g, bias_v, True, fmt, underflow).view(y.shape[1:])


def _round_exact(y: torch.Tensor, fmt: NumberFormat, underflow: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Round exact float64 conv results (N, C, H, W) once, with a per-channel bias inside."""
    n, c = y.shape[:2]
    g = y.reshape(n, c, -1).contiguous()
    be = backend_for(g.device)
    if bias is None:
        return be.round_flat(g, fmt, underflow).view(y.shape)
    return be.round_sum(g, _operand(bias).double().reshape(c), True, fmt, underflow).view(y.shape)


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: NumberFormat,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    mode: str = "exact",
    underflow: bool = False,
) -> torch.Tensor:
    """2-D convolution (as torch.nn.functional.conv2d) with one quire per output element.

    x is (N, C, H, W) and w is (O, C // groups, kh, kw). When the operands' spans make a
    float64 convolution exact, torch computes it and the bias is added in the rounding; a
    little wider, torch convolves a few exact slices of them (``_native_plan``), summed in
    limbs; otherwise it is a sliced GEMM over the unfolded input (K = C/groups * kh * kw).
    """
    _check_operand(x, "x")
    _check_operand(w, "w")
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"conv2d expects x (N, C, H, W) and w (O, C/groups, kh, kw), got {tuple(x.shape)} and {tuple(w.shape)}")
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"conv2d channels do not match: input has {c}, weight expects {cg} x {groups} groups, {o} outputs")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    plan = _native_plan(x, w, cg * kh * kw) if mode == "exact" else None
    if plan is not None:
        if _whole_window(x.shape, w.shape, stride, padding, dilation, groups):
            op = lambda u, v: (u.reshape(n, -1) @ v.reshape(o, -1).t()).view(n, o, 1, 1)  # noqa: E731
        else:
            op = lambda u, v: F.conv2d(u, v, None, stride, padding, dilation, groups)  # noqa: E731
        return _native_op(op, x, w, plan, fmt, underflow, bias).to(x.device)
    if mode == "none":
        y = scatter.conv2d(_host(x), _host(w), None if bias is None else _host(bias), fmt, stride, padding, dilation,
                           groups, underflow)
        if y is not None:
            return y.to(x.device)
    hout = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wout = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    cols = cols.view(n, groups, cg * kh * kw, hout * wout).permute(1, 0, 3, 2).reshape(groups, n * hout * wout, cg * kh * kw)
    wg = w.reshape(groups, o // groups, cg * kh * kw).transpose(1, 2)  # (groups, K, O/groups)
    outs = []
    for g in range(groups):
        bg = None if bias is None else bias[g * (o // groups):(g + 1) * (o // groups)]
        outs.append(matmul(cols[g], wg[g], fmt, bias=bg, mode=mode, underflow=underflow))
    y = torch.cat(outs, dim=-1)  # (N*L, O)
    return y.view(n, hout, wout, o).permute(0, 3, 1, 2).contiguous()


def conv2d_input_grad(
    grad: torch.Tensor,
    w: torch.Tensor,
    input_shape: tuple[int, int, int, int] | torch.Size,
    fmt: NumberFormat,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    mode: str = "exact",
    underflow: bool = False,
) -> torch.Tensor:
    """The input error of a convolution (a transposed convolution), one quire per input
    element: sum over output channels and kernel taps of grad * w, rounded once."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, c, h, wd = input_shape
    co, cg, kh, kw = w.shape
    # float32 input gradients are slow when few channels receive them
    plan = _native_plan(grad, w, (co // groups) * kh * kw, INPUT_GRAD_ADVANTAGE if cg >= 6 else 0) \
        if mode == "exact" else None
    if plan is not None:
        if _whole_window(input_shape, w.shape, stride, padding, dilation, groups) and tuple(grad.shape[2:]) == (1, 1):
            op = lambda u, v: (u.reshape(n, co) @ v.reshape(co, -1)).view(n, c, h, wd)  # noqa: E731
        else:
            op = lambda u, v: torch.nn.grad.conv2d_input(tuple(input_shape), v, u, stride, padding, dilation, groups)  # noqa: E731
        return _native_op(op, grad, w, plan, fmt, underflow).to(grad.device)
    if mode == "none":
        dx = scatter.conv2d_input_grad(_host(grad), _host(w), input_shape, fmt, stride, padding, dilation, groups, underflow)
        if dx is not None:
            return dx.to(grad.device)
    # The output error dilated by the stride and padded, convolved with the rotated kernel.
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    d = grad
    if (sh, sw) != (1, 1):
        dd = d.new_zeros(n, co, (d.shape[2] - 1) * sh + 1, (d.shape[3] - 1) * sw + 1)
        dd[:, :, ::sh, ::sw] = d
        d = dd
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    bottom, right = h - d.shape[2] + ph, wd - d.shape[3] + pw
    d = F.pad(d, (left, right, top, bottom))
    w_t = w.reshape(groups, co // groups, cg, kh, kw).transpose(1, 2).reshape(groups * cg, co // groups, kh, kw)
    return conv2d(d, w_t.flip(-1, -2), None, fmt, 1, 0, (dh, dw), groups, mode=mode, underflow=underflow)


def conv2d_weight_grad(
    x: torch.Tensor,
    grad: torch.Tensor,
    weight_shape: tuple[int, int, int, int] | torch.Size,
    fmt: NumberFormat,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    mode: str = "exact",
    underflow: bool = False,
) -> torch.Tensor:
    """The weight gradient of a convolution, one quire per weight over every batch element
    and output position (K = N * Hout * Wout), rounded once (not divided by N)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, co, ho, wo = grad.shape
    plan = _native_plan(x, grad, n * ho * wo) if mode == "exact" else None
    if plan is not None:
        if _whole_window(x.shape, weight_shape, stride, padding, dilation, groups) and (ho, wo) == (1, 1):
            op = lambda u, v: (v.reshape(n, co).t() @ u.reshape(n, -1)).view(tuple(weight_shape))  # noqa: E731
        else:
            op = lambda u, v: torch.nn.grad.conv2d_weight(u, tuple(weight_shape), v, stride, padding, dilation, groups)  # noqa: E731
        return _native_op(op, x, grad, plan, fmt, underflow).to(grad.device)
    kh, kw = weight_shape[2:]
    if mode == "none" and lookup.supports(fmt):
        dw = lookup.conv2d_weight_grad(_host(x), _host(grad), weight_shape, fmt, stride, padding, dilation, groups, underflow)
        if dw is not None:
            return dw.to(grad.device)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kk, L)
    k = cols.shape[1] // groups
    cols = cols.reshape(n, groups, k, ho * wo).permute(1, 0, 3, 2).reshape(groups, n * ho * wo, k)
    d3 = grad.reshape(n, groups, co // groups, ho * wo).permute(1, 2, 0, 3).reshape(groups, co // groups, n * ho * wo)
    return matmul(d3, cols, fmt, mode=mode, underflow=underflow).reshape(weight_shape)


class Quire:
    """An incremental exact accumulator: one quire per element of ``shape``.

    The state is a tensor of int64 limbs (``state_dict()``) in units of minpos**2 of
    ``fmt`` (a posit or a binary float), as wide as the format's products plus 2**64 of
    headroom, so quires can be saved, loaded and summed across processes exactly
    (addition of quires is associative). Adding a value that is not a multiple of
    minpos**2 raises ValueError.
    """

    def __init__(self, fmt: NumberFormat, shape: tuple[int, ...] | torch.Size = ()) -> None:
        self.fmt = fmt
        self.shape = torch.Size(shape)
        # Products of two values are multiples of minpos**2 below maxpos**2 (minpos is a power
        # of two for every format; maxpos, for floats, is not).
        low, top = math.frexp(fmt.minpos)[1] - 1, math.ceil(math.log2(fmt.maxpos))
        self.lsb = 2 * low
        nl = (2 * top - self.lsb + 64 + 40) // acc.LIMB + 4  # products, 2**64 of carry room
        self.limbs = torch.zeros((self.shape.numel(), nl), dtype=torch.int64)

    def clear(self) -> "Quire":
        """Reset every quire to zero."""
        self.limbs.zero_()
        return self

    def _add_terms(self, *terms: torch.Tensor) -> None:
        """Add every term, or (on a bad one) none: a quire never holds half an update."""
        flat = [torch.broadcast_to(t.detach().cpu().double(), self.shape).reshape(-1).contiguous() for t in terms]
        for t in flat:
            if (~torch.isfinite(t)).any():
                raise ValueError("cannot add NaR (NaN or inf) to a quire: its value would be lost")
            bad = acc.quire_add(self.limbs.numpy(), t.numpy(), self.lsb, False)
            if bad:
                raise ValueError(
                    f"{bad} term(s) are not multiples of minpos**2 of {self.fmt} or exceed its quire: not {self.fmt} values"
                )
        for t in flat:
            acc.quire_add(self.limbs.numpy(), t.numpy(), self.lsb, True)

    def add(self, x: torch.Tensor) -> "Quire":
        """Add x (broadcast to the quire's shape) exactly."""
        self._add_terms(_check_operand(x, "x"))
        return self

    def add_product(self, a: torch.Tensor, b: torch.Tensor) -> "Quire":
        """Add a * b exactly (the product is split into two floats without error)."""
        a = _check_operand(a, "a").detach().cpu().double()
        b = _check_operand(b, "b").detach().cpu().double()
        p = a * b
        err = _product_error(a, b, p)
        self._add_terms(p, err)
        return self

    def sub_product(self, a: torch.Tensor, b: torch.Tensor) -> "Quire":
        """Subtract a * b exactly."""
        return self.add_product(-_check_operand(a, "a"), b)

    def to_format(self, underflow: bool = False) -> torch.Tensor:
        """Round every quire once to ``fmt`` (a posit or a binary float)."""
        return self.to_posit(underflow)

    def to_posit(self, underflow: bool = False) -> torch.Tensor:
        """Round every quire once to ``fmt`` (the name predates float formats; ``to_format``)."""
        out = torch.empty(self.shape.numel(), dtype=self.fmt.dtype)
        acc.quire_round(self.limbs.numpy(), self.lsb, out.numpy(), self.fmt._accumulate_params(underflow))
        return out.view(self.shape)

    def __add__(self, other: "Quire") -> "Quire":
        if not isinstance(other, Quire) or other.fmt != self.fmt or other.shape != self.shape:
            return NotImplemented
        out = Quire(self.fmt, self.shape)
        out.limbs = self.limbs + other.limbs  # digits < 2**20: no overflow; normalised on use
        return out

    def state_dict(self) -> dict:
        """The exact state: format, shape and limbs."""
        return {"format": str(self.fmt), "shape": list(self.shape), "limbs": self.limbs.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by ``state_dict``: same format and shape, and limbs of
        this quire's shape and dtype, small enough for the kernels to carry exactly.
        Raises ValueError naming the key at fault; the quire is unchanged then."""
        self.limbs = self._checked_limbs(state)

    def _checked_limbs(self, state: Mapping[str, Any]) -> torch.Tensor:
        """The limbs of ``state`` (a CPU copy) after checking every invariant the kernels
        rely on: they index rows and limbs without bounds checks, in int64."""
        keys = {"format", "shape", "limbs"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"quire state must be a dict with keys {sorted(keys)}, got {got}")
        fmt = state["format"]
        parsed = None
        for kind in (Posit, Float):
            try:
                parsed = kind.parse(fmt)
                break
            except (ValueError, TypeError):
                pass
        if parsed != self.fmt:
            raise ValueError(f"quire state key 'format' is {fmt!r}, expected {str(self.fmt)!r}")
        shape = state["shape"]
        if not isinstance(shape, (list, tuple, torch.Size)) or list(shape) != list(self.shape):
            raise ValueError(f"quire state key 'shape' is {shape!r}, expected {list(self.shape)}")
        limbs = state["limbs"]
        if not isinstance(limbs, torch.Tensor) or limbs.dtype != torch.int64:
            got = f"a tensor of dtype {limbs.dtype}" if isinstance(limbs, torch.Tensor) else type(limbs).__name__
            raise ValueError(f"quire state key 'limbs' is {got}, expected a torch.int64 tensor")
        if limbs.shape != self.limbs.shape:
            raise ValueError(
                f"quire state key 'limbs' has shape {tuple(limbs.shape)}, expected {tuple(self.limbs.shape)} "
                f"(one row per quire, {self.limbs.shape[1]} limbs of {acc.LIMB} bits for {self.fmt})"
            )
        limbs = limbs.detach().cpu().clone().contiguous()
        # Saved limbs are digits < 2**LIMB, or sums of a few quires' digits (__add__ does not
        # carry); far larger ones would overflow int64 as the kernels add and carry.
        if limbs.numel() and int(limbs.abs().max()) > LIMB_BOUND:
            raise ValueError(
                f"quire state key 'limbs' holds a limb of magnitude {int(limbs.abs().max())}, "
                f"expected at most 2**{LIMB_BOUND.bit_length() - 1} (a corrupt state)"
            )
        top = _carry_top(limbs)
        if top.numel() and not bool(((top >= -1) & (top <= 0)).all()):
            raise ValueError(
                f"quire state key 'limbs' holds a value beyond the quire's {limbs.shape[1] * acc.LIMB - 1} bits "
                f"(the top limb carries to {int(top[(top < -1) | (top > 0)][0])}, expected 0 or -1)"
            )
        return limbs


def _carry_top(limbs: torch.Tensor) -> torch.Tensor:
    """Per row, what the top limb holds after carrying every lower limb into digits (as
    ``kernels.accumulate.normalize``): 0 or -1 for a value that fits the row."""
    carry = torch.zeros(limbs.shape[0], dtype=torch.int64)
    for col in limbs[:, :-1].unbind(1):
        carry = (col + carry) >> acc.LIMB
    return limbs[:, -1] + carry


def _product_error(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """a*b - p exactly (Dekker's TwoProduct with Veltkamp splitting), for float64 tensors."""
    split = 134217729.0  # 2**27 + 1
    ca, cb = split * a, split * b
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def matmul_quire(a: torch.Tensor, b: torch.Tensor, fmt: NumberFormat) -> tuple[Quire, torch.Tensor]:
    """a @ b (2-D, or 3-D batched with equal batch sizes) as unrounded quire state.

    Returns a :class:`Quire` of ``fmt`` of shape (*batch, M, N) holding every output's exact
    sum, and a bool tensor of that shape marking the outputs a NaR operand reaches (a
    quire cannot hold NaR). The slice GEMMs are those of ``matmul(mode="exact")``; their
    exact float64 results are added into the limbs instead of being rounded, so quires of
    two halves of K added limb by limb (``Quire.__add__``, an int64 all-reduce) hold the
    whole sum. Operands must be values of ``fmt`` (or of a format its quire contains):
    products below minpos**2 raise ValueError.
    """
    _check_operand(a, "a")
    _check_operand(b, "b")
    if a.dim() not in (2, 3) or b.dim() != a.dim() or a.shape[-1] != b.shape[-2] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul_quire takes (M, K) @ (K, N) or (B, M, K) @ (B, K, N), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    batch = tuple(a.shape[:-2])
    a3 = _host(a).reshape(-1, *a.shape[-2:])
    b3 = _host(b).reshape(-1, *b.shape[-2:])
    nb, M, K = a3.shape
    N = b3.shape[-1]
    q = Quire(fmt, (*batch, M, N))
    nar = torch.zeros((nb, M, N), dtype=torch.bool)
    if K == 0 or M == 0 or N == 0 or nb == 0:
        return q, nar.view(*batch, M, N)
    a64, top_a, span_a, (ta, la) = _scan(a3)
    bt64, top_b, span_b, (tb, lb) = _scan(b3.transpose(-1, -2))
    if span_a and span_b and not _products_fit(ta, la, tb, lb, K):
        raise ValueError(f"matmul_quire: products of these operands span 2**{la + lb} to 2**{ta + tb} (K = {K}), "
                         f"beyond float64's exact range")
    wa, wb = _widths(span_a, span_b, 53 - math.ceil(math.log2(max(K, 1))), a3.numel(), b3.numel(), nb * M * N)
    lhs = _slices(a64, top_a, span_a, wa)
    rhs = _slices(bt64, top_b, span_b, wb)
    P, Q = lhs.shape[1] // M, rhs.shape[1] // N
    terms = torch.matmul(lhs, rhs.transpose(-1, -2)).view(nb, P, M, Q, N)
    nar |= (~torch.isfinite(terms)).any(3).any(1)
    for p in range(P):
        for s in range(Q):
            t = terms[:, p, :, s, :].contiguous().view(-1)
            bad = acc.quire_add(q.limbs.numpy(), t.numpy(), q.lsb, False)
            if bad:
                raise ValueError(f"matmul_quire: {bad} product sum(s) are not multiples of minpos**2 of {fmt}: the "
                                 f"operands are not {fmt} values")
            acc.quire_add(q.limbs.numpy(), t.numpy(), q.lsb, True)
    return q, nar.view(*batch, M, N)


def round_quire(q: Quire, nar: torch.Tensor | None = None, underflow: bool = False) -> torch.Tensor:
    """Every quire of ``q`` rounded once to its format (``Quire.to_posit``), NaR (NaN)
    where ``nar`` is set. The limbs may be sums of up to ``LIMB_BOUND >> LIMB`` quires'
    digits (an all-reduce that did not carry): the rounding carries them in int64 first."""
    if q.limbs.numel() and int(q.limbs.abs().max()) > LIMB_BOUND:
        raise ValueError(f"quire limbs exceed 2**{LIMB_BOUND.bit_length() - 1}: more than "
                         f"{LIMB_BOUND >> acc.LIMB} quires were summed without carrying")
    out = q.to_posit(underflow)
    return out if nar is None else out.masked_fill(nar.view(out.shape), float("nan"))
