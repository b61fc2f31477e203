"""The quire's device parts for the Triton backend, on the tensor's device.

Span scans, slicing and the rounding of exact float64 results are Triton kernels
(``quire_kernels``). The exact recombination of several slice-GEMM results is integer
arithmetic in 20-bit limbs, as ``kernels.accumulate.round_limbs`` does per element, here
vectorised over all elements with torch integer ops on the device (a scatter-add per term
and a carry pass per limb), followed by one Triton rounding kernel. Planning reads a few
integers back (the spans that choose the slice widths, and the limb count): one small
synchronisation per quire GEMM, none per element.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton

from . import quire_kernels as qk
from .launch import block, check_device, interpreting

if TYPE_CHECKING:
    from ...format import Posit

LIMB = 20
LIMB_MASK = (1 << LIMB) - 1
NO_BITS = 1 << 30


def _row_blocks() -> tuple[int, int]:
    return (64, 256) if interpreting() else (16, 128)


def scan_rows(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(copy, top, low) of the rows of ``flat`` (R, K): a float64 copy (``flat`` itself if
    it is float64), max|x[r]| < 2**top[r], x[r] a multiple of 2**low[r]."""
    check_device(flat.device)
    flat = flat.contiguous()
    R, K = flat.shape
    top = torch.empty(R, dtype=torch.int64, device=flat.device)
    low = torch.empty(R, dtype=torch.int64, device=flat.device)
    write = flat.dtype != torch.float64
    copy = torch.empty(flat.shape, dtype=torch.float64, device=flat.device) if write else flat
    if R and K:
        br, bk = _row_blocks()
        qk.scan_rows_kernel[(triton.cdiv(R, br),)](flat, top, low, copy, R, K, write, BR=br, BK=bk)
    else:
        top.fill_(-NO_BITS)
        low.fill_(NO_BITS)
    return copy, top, low


def row_extent(top: torch.Tensor, low: torch.Tensor) -> tuple[int, int, int]:
    """(highest top, lowest low, widest span) over the used rows of a scan, (0, 0, -1)
    when none is used; read back."""
    used = low < NO_BITS
    if not bool(used.any()):
        return 0, 0, -1
    hi, lo, span = torch.stack([top[used].max(), low[used].min(), (top - low)[used].max()]).tolist()
    return int(hi), int(lo), int(span)


def global_span(flat: torch.Tensor) -> tuple[int, int, int]:
    """(top, low, nonfinite) over a whole tensor, as ``slicing.global_span``; read back."""
    check_device(flat.device)
    flat = flat.detach().contiguous().view(-1)
    n = flat.numel()
    if n == 0:
        return -NO_BITS, NO_BITS, 0
    b = block()
    g = triton.cdiv(n, b)
    parts = torch.empty((3, g), dtype=torch.int64, device=flat.device)
    qk.span_partials_kernel[(g,)](flat, parts[0], parts[1], parts[2], n, BLOCK=b)
    top, low, bad = torch.stack([parts[0].max(), parts[1].min(), parts[2].sum()]).tolist()
    return int(top), int(low), int(bad)


def split_rows(x: torch.Tensor, top: torch.Tensor, w: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Exact slices (B, S, R, K) of the float64 rows x (B*R, K) below each row's top
    (``slicing.split_rows``)."""
    nb, S, R, K = shape
    out = torch.empty(shape, dtype=torch.float64, device=x.device)
    size = x.numel()
    if size:
        b = block()
        qk.split_rows_kernel[(triton.cdiv(size, b),)](x.contiguous(), top.contiguous(), out, size, K, R, S, w, BLOCK=b)
    return out


def split_flat(x: torch.Tensor, top: int, w: int, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact slices (count, numel) of a float64 tensor below one common 2**top, in ``dtype``."""
    flat = x.double().contiguous().view(1, -1)
    tops = torch.full((1,), top, dtype=torch.int64, device=x.device)
    return split_rows(flat, tops, w, (1, count, 1, flat.shape[1])).view(count, -1).to(dtype)


def _round_sum(G: torch.Tensor, bias: torch.Tensor | None, stride: int, count: int, fmt: Posit, underflow: bool) -> torch.Tensor:
    check_device(G.device)
    G = G.contiguous()
    out = torch.empty(G.shape, dtype=fmt.dtype, device=G.device)
    size = G.numel()
    if size:
        b = block()
        bias_t = G if bias is None else bias.to(G.device, torch.float64).contiguous()
        qk.round_sum_kernel[(triton.cdiv(size, b),)](
            G, bias_t, out, size, stride, count, fmt.nbits, fmt.es, bool(underflow), bias is not None, BLOCK=b
        )
    return out


def round_flat(G: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    """round(G) of exact float64 results, element by element (``accumulate.round_flat``)."""
    return _round_sum(G, None, 1, 1, fmt, underflow)


def round_sum(G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit, underflow: bool) -> torch.Tensor:
    """round(G + bias) for exact float64 G (B, M, N); the bias runs along the columns, or
    along the rows with ``bias_on_rows`` (``accumulate.round_sum``)."""
    if bias is None or bias.numel() == 0:
        return round_flat(G, fmt, underflow)
    nb, M, N = G.shape
    return _round_sum(G, bias.reshape(-1), N if bias_on_rows else 1, M if bias_on_rows else N, fmt, underflow)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    return ((k + 1023) << 52).view(torch.float64)


def round_exact_sum(terms: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    """round(sum_t terms[t]) exactly, for finite float64 terms (T, E), rounded once; NaN
    where a term is not finite. The device twin of ``accumulate.round_limbs`` over the
    terms' integer parts."""
    check_device(terms.device)
    T, E = terms.shape
    dev = terms.device
    finite = torch.isfinite(terms).all(0)
    v = torch.where(torch.isfinite(terms), terms, 0.0)
    u = v.view(torch.int64)
    biased = (u >> 52) & 0x7FF
    mant = (u & ((1 << 52) - 1)) | torch.where(biased > 0, 1 << 52, 0)
    exp = torch.where(biased > 0, biased, 1) - 1075
    live = mant != 0
    lsb = torch.where(live, exp, NO_BITS).amin(0)
    top = torch.where(live, exp + 53, -NO_BITS).amax(0)
    nonzero = top >= lsb
    lsb = torch.where(nonzero, lsb, 0)
    width = torch.where(nonzero, top - lsb, 0)
    nl = (int(width.max()) + 16) // LIMB + 4 if E else 4  # the one read-back: the limb count
    off = torch.where(live, exp - lsb, 0)
    q, r = off // LIMB, off % LIMB
    sgn = torch.where(u < 0, -1, 1)
    limbs = torch.zeros((E, nl), dtype=torch.int64, device=dev)
    for part in range(3):
        digit = (mant >> (LIMB * part)) & (LIMB_MASK if part < 2 else -1)
        limbs.scatter_add_(1, (q + part).t(), (sgn * (digit << r)).t())

    def normalize(x: torch.Tensor) -> torch.Tensor:
        carry = torch.zeros(E, dtype=torch.int64, device=dev)
        cols = []
        for col in x[:, :-1].unbind(1):
            s = col + carry
            cols.append(s & LIMB_MASK)
            carry = s >> LIMB
        cols.append(x[:, -1] + carry)
        return torch.stack(cols, 1)

    limbs = normalize(limbs)
    neg = limbs[:, -1] < 0
    limbs = normalize(torch.where(neg[:, None], -limbs, limbs))
    nz = limbs != 0
    any_nz = nz.any(1)
    idx = torch.arange(nl, device=dev)
    t = torch.where(nz, idx, -1).amax(1)
    tc = t.clamp_min(0)

    def limb(i: torch.Tensor) -> torch.Tensor:
        got = limbs.gather(1, i.clamp_min(0)[:, None]).squeeze(1)
        return torch.where(i >= 0, got, 0)

    x = (limb(tc) << (2 * LIMB)) + (limb(t - 1) << LIMB) + limb(t - 2)
    sticky = (nz & (idx[None, :] < (t - 2)[:, None])).any(1)
    h0 = x.to(torch.float64)
    d = x - h0.to(torch.int64)
    tie = torch.where(d > 0, 1.0, torch.where(d < 0, -1.0, torch.where(sticky, 1.0, 0.0))).to(torch.float64)
    e = lsb + LIMB * (t - 2)
    ec = (e + 61).clamp(-1000, 1000) - 61  # keep pow2's exponents defined where saturated
    halfc = torch.div(ec, 2, rounding_mode="floor")
    h = h0 * _pow2(halfc) * _pow2(ec - halfc)
    h = torch.where(e + 61 > 1000, 1.7976931348623157e308, torch.where(e + 61 < -1000, 2.0**-1000, h))
    h = torch.where(neg, -h, h)
    tie = torch.where(neg, -tie, tie)
    h = torch.where(any_nz, h, 0.0)
    tie = torch.where(any_nz, tie, 0.0)
    out = torch.empty(E, dtype=fmt.dtype, device=dev)
    if E:
        b = block()
        qk.round_value_kernel[(triton.cdiv(E, b),)](h.contiguous(), tie.contiguous(), out, E, fmt.nbits, fmt.es,
                                                    bool(underflow), BLOCK=b)
    return torch.where(finite, out, torch.nan)


def round_terms(G: torch.Tensor, P: int, Q: int, bias: torch.Tensor | None, fmt: Posit, underflow: bool) -> torch.Tensor:
    """out[b, i, j] = round(sum_pq G[b, pM + i, qN + j] + bias[j]) exactly
    (``accumulate.round_terms``)."""
    nb, PM, QN = G.shape
    M, N = PM // P, QN // Q
    terms = G.view(nb, P, M, Q, N).permute(1, 3, 0, 2, 4).reshape(P * Q, nb * M * N)
    if bias is not None and bias.numel():
        b = bias.to(G.device, torch.float64).reshape(1, 1, N).expand(nb, M, N).reshape(1, -1)
        terms = torch.cat([terms, b])
    return round_exact_sum(terms, fmt, underflow).view(nb, M, N)


def round_stack(G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit, underflow: bool) -> torch.Tensor:
    """out[b, i, j] = round(sum_t G[t, b, i, j] + bias) exactly, the bias along the
    columns or the rows (``accumulate.round_stack``)."""
    T, nb, M, N = G.shape
    terms = G.reshape(T, -1)
    if bias is not None and bias.numel():
        b = bias.to(G.device, torch.float64)
        b = (b.view(1, M, 1) if bias_on_rows else b.view(1, 1, N)).expand(nb, M, N).reshape(1, -1)
        terms = torch.cat([terms, b])
    return round_exact_sum(terms, fmt, underflow).view(nb, M, N)
