"""The no-quire mode of narrow formats by table look-up on bit patterns (``kernels.lut``).

``quire.matmul(..., mode="none")`` rounds every product and every addition in order over
K. For a format of at most ``MAX_BITS`` bits whose values are all float32s, both steps are
tables of 2**(2n) patterns, built once per format and underflow option with the float
kernel's own scalar code, so this path is bit-identical to ``accumulate.sequential_dot``.
Every entry point returns None (``scatter``: False) where it would not be (an operand that
is not a value of the format, a bias that rounds to -0); the caller then runs the float
kernel. Operands come as CPU float32 or float64 tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from .floatformat import Float
from .format import Posit
from .kernels import lut
from .kernels import scatter as scatter_kernels

NumberFormat = Posit | Float
# 12 bits: two tables of 16M uint16 entries (64 MiB); wider ones no longer pay for
# themselves against the float kernel, as their look-ups miss every cache.
MAX_BITS = 12
_BLOCK_ENTRIES = 1 << 20  # table entries built and encoded at a time, to bound the float64 scratch
_CACHE: dict = {}


def supports(fmt: NumberFormat) -> bool:
    """Whether ``fmt`` has look-up tables: at most ``MAX_BITS`` bits, every value a float32."""
    return fmt.nbits <= MAX_BITS and fmt.dtype == torch.float32


def _pattern_dtype(fmt: NumberFormat) -> tuple[torch.dtype, type]:
    return (torch.uint8, np.uint8) if fmt.nbits <= 8 else (torch.uint16, np.uint16)


def _key_shift(fmt: NumberFormat) -> int:
    """Low float32 bits the keys ignore: the top 9 + f bits identify every value of at most
    f fraction bits (16 for all 8-bit formats, which keeps their keys at 64K entries)."""
    return 24 - max(fmt.max_significand_bits, 8)


def tables(fmt: NumberFormat, underflow: bool) -> tuple:
    """(values, mul, add, keys, bits, nonfinite, inf_is_nan) of ``fmt`` for ``kernels.lut``."""
    key = (fmt, bool(underflow))
    if key not in _CACHE:
        vals = fmt.values().double().numpy()
        S = vals.size
        _, np_dtype = _pattern_dtype(fmt)
        mul, add = np.empty(S * S, dtype=np_dtype), np.empty(S * S, dtype=np_dtype)
        rows = max(1, _BLOCK_ENTRIES // S)
        prods, sums = np.empty((rows, S)), np.empty((rows, S))
        for p0 in range(0, S, rows):
            r = min(rows, S - p0)
            lut.build(vals, fmt._accumulate_params(underflow), p0, prods[:r], sums[:r])
            block = slice(p0 * S, (p0 + r) * S)
            mul[block] = patterns_of(torch.from_numpy(prods[:r]).reshape(-1), fmt).numpy()
            add[block] = patterns_of(torch.from_numpy(sums[:r]).reshape(-1), fmt).numpy()
        nan_pattern = int(patterns_of(torch.tensor([float("nan")]), fmt)[0])
        keys, bits = lut.float32_keys(vals, nan_pattern, _key_shift(fmt), np_dtype)
        inf_is_nan = bool(fmt.round(torch.tensor([float("inf")])).isnan().all())
        _CACHE[key] = (vals, mul, add, keys, bits, np.isnan(vals) | np.isinf(vals), inf_is_nan)
    return _CACHE[key]


def patterns_of(values: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Unsigned bit patterns (int64) of format values, through the format's own encode."""
    bits = fmt.encode(values)
    if bits.dtype.is_floating_point:  # torch's float8/16 storage: the same bits as integers
        bits = bits.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[bits.element_size()])
    return bits.to(torch.int64) & ((1 << fmt.nbits) - 1)


def patterns(t: torch.Tensor, fmt: NumberFormat, underflow: bool) -> torch.Tensor | None:
    """t's values as unsigned n-bit patterns (t's shape), or None if any is not a value of
    ``fmt`` (NaN is NaR or NaN; -0 is looked up as 0)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.float64:  # the format's values are float32s; others are refused below
        narrow = flat.float()
        if not bool(((narrow.double() == flat) | flat.isnan()).all()):
            return None
        flat = narrow
    _, _, _, keys, bits, _, inf_is_nan = tables(fmt, underflow)
    p = torch.empty(flat.shape, dtype=_pattern_dtype(fmt)[0])
    bad = lut.f32_patterns(flat.view(torch.int32).numpy().view(np.uint32), keys, _key_shift(fmt), bits, p.numpy(),
                           inf_is_nan)
    return None if bad else p.view(t.shape)


def _acc0(bias: torch.Tensor | None, N: int, fmt: NumberFormat, underflow: bool) -> torch.Tensor | None:
    """The initial accumulator patterns: round(bias), or 0; None for a bias that rounds to
    -0 (the float path keeps that sign, the patterns cannot)."""
    if bias is None:
        return torch.zeros(N, dtype=torch.int64)
    rb = fmt.round(bias.detach().cpu().double().reshape(N).contiguous(), underflow=underflow)
    if bool(((rb == 0) & torch.signbit(rb)).any()):
        return None
    return patterns(rb, fmt, underflow).to(torch.int64)


def run(pa: torch.Tensor, pb: torch.Tensor, acc0: torch.Tensor, fmt: NumberFormat, underflow: bool) -> torch.Tensor:
    """Patterns pa (B, M, K) and pb (B, K, N), accumulators acc0 (B, N): (B, M, N) values."""
    vals, mul, add, _, _, nonfinite, _ = tables(fmt, underflow)
    out = torch.empty((pa.shape[0], pa.shape[1], pb.shape[2]), dtype=fmt.dtype)
    lut.lut_dot(pa.contiguous().numpy(), pb.contiguous().numpy(), acc0.contiguous().numpy(), mul, add, vals, out.numpy(),
                fmt.nbits, nonfinite)
    return out


def bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, fmt: NumberFormat, underflow: bool) -> torch.Tensor | None:
    """a (B, M, K) @ b (B, K, N) (+ bias, the initial accumulator) with every product and
    addition rounded in order, or None where the tables would not be bit-identical."""
    if not supports(fmt):
        return None
    pa = patterns(a, fmt, underflow)
    pb = None if pa is None else patterns(b, fmt, underflow)
    acc0 = None if pb is None else _acc0(bias, b.shape[-1], fmt, underflow)
    if acc0 is None:
        return None
    return run(pa, pb, acc0.expand(a.shape[0], -1), fmt, underflow)


def _cols(px: torch.Tensor, k, stride, padding, dilation, groups) -> tuple[torch.Tensor, tuple[int, int]]:
    """Unfolded patterns (groups, N*L, C/groups*kh*kw), as torch's unfold orders them, and
    the output size (ho, wo)."""
    n, c, h, w = px.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = torch.empty((groups, n * ho * wo, c // groups * kh * kw), dtype=px.dtype)
    lut.pattern_cols(px.contiguous().numpy(), kh, kw, sh, sw, ph, pw, dh, dw, cols.numpy())
    return cols, (ho, wo)


def scatter(src: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, maps: tuple, out: torch.Tensor,
            fmt: NumberFormat, underflow: bool) -> bool:
    """``kernels.scatter.lut_scatter`` into out (its arguments are ``scatter_dot``'s);
    False, with out untouched, where the tables would not be bit-identical."""
    if not supports(fmt):
        return False
    ps = patterns(src, fmt, underflow)
    pb = None if ps is None else patterns(b, fmt, underflow)
    acc0 = None if pb is None else _acc0(bias, out.shape[-1], fmt, underflow)
    if acc0 is None:
        return False
    vals, mul, add, _, _, _, _ = tables(fmt, underflow)
    scatter_kernels.lut_scatter(ps.contiguous().numpy(), pb.contiguous().numpy(), acc0.view(b.shape[0], -1).numpy(),
                                *maps, mul, add, vals, out.numpy(), fmt.nbits)
    return True


def conv2d_weight_grad(x, grad, weight_shape, fmt, stride, padding, dilation, groups, underflow) -> torch.Tensor | None:
    """``quire.conv2d_weight_grad`` in mode "none" on bit patterns, or None."""
    if not supports(fmt):
        return None
    px = patterns(x, fmt, underflow)
    pd = None if px is None else patterns(grad, fmt, underflow)
    if pd is None:
        return None
    n, co, ho, wo = grad.shape
    _, _, kh, kw = weight_shape
    cols, _ = _cols(px, (kh, kw), stride, padding, dilation, groups)  # (groups, N*L, K)
    d3 = pd.reshape(n, groups, co // groups, ho * wo).permute(1, 2, 0, 3).reshape(groups, co // groups, n * ho * wo)
    zero = torch.zeros((groups, cols.shape[2]), dtype=torch.int64)
    return run(d3, cols, zero, fmt, underflow).reshape(weight_shape)
