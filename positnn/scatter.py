"""The no-quire mode's convolutions and input errors by scattering (``kernels.scatter``).

Unfolding a convolution's input copies it kh*kw times, and an input error's transposed
convolution first dilates and pads the output error with zeros, which every output then
reads. Scattering each nonzero source element to the outputs it reaches skips all those
zeros and adds every output's terms in the unfolded order, so the result is bit-identical
to ``quire.matmul(..., mode="none")`` on the unfolded operands. Narrow formats take the
look-up tables (``lookup.scatter``); the others the float kernel, for input errors only.
"""

from __future__ import annotations

import torch

from . import lookup
from .floatformat import Float
from .format import Posit
from .kernels import scatter as kernels

NumberFormat = Posit | Float


def _tap_map(src: int, k: int, dst: int, target) -> torch.Tensor:
    """(src, k) int64: the output coordinate target(u, a) = numerator / divisor that source
    coordinate u reaches under tap a, or -1 where that is no whole number in [0, dst)."""
    u, a = torch.arange(src).view(-1, 1), torch.arange(k).view(1, -1)
    num, div = target(u, a)
    t = torch.div(num, div, rounding_mode="floor")
    return torch.where((num % div == 0) & (t >= 0) & (t < dst), t, -1)


def _scatter(src: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, maps: tuple, out_hw: tuple[int, int],
             fmt: NumberFormat, underflow: bool, tables_only: bool) -> torch.Tensor | None:
    """(N, G*Og, *out_hw): src scattered through kernel b (G, Cg, kh, kw, Og); None when b
    holds NaR, NaN or an infinity, whose products with the skipped zeros would count, and
    with ``tables_only`` where the look-up tables do not apply."""
    if not bool(torch.isfinite(b).all()):
        return None
    out = torch.empty((src.shape[0], *out_hw, b.shape[0] * b.shape[-1]), dtype=fmt.dtype)
    maps = tuple(m.numpy() for m in maps)
    if not lookup.scatter(src, b, bias, maps, out, fmt, underflow):
        if tables_only:
            return None
        bias64 = torch.empty(0, dtype=torch.float64) if bias is None else bias.detach().double().reshape(-1)
        kernels.scatter_dot(src.contiguous().numpy(), b.contiguous().numpy(), bias64.contiguous().numpy(), *maps,
                            out.numpy(), fmt._accumulate_params(underflow))
    return out.permute(0, 3, 1, 2).contiguous()


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: NumberFormat, stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int], groups: int, underflow: bool) -> torch.Tensor | None:
    """``quire.conv2d(..., mode="none")`` of CPU tensors x (N, C, H, W) and w (O, C/groups,
    kh, kw) with the bias as each output's first term, by look-up tables; None where they
    do not apply or w holds NaR, NaN or infinities. (Without tables, the float kernel's
    SIMD loop over the unfolded input is faster than a scalar scatter, as the input has
    few zeros and no padding to skip.)"""
    _, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    maps = (_tap_map(h, kh, ho, lambda u, a: (u + ph - a * dh, sh)), _tap_map(wd, kw, wo, lambda v, b: (v + pw - b * dw, sw)))
    b = w.reshape(groups, o // groups, cg, kh, kw).permute(0, 2, 3, 4, 1)  # (G, C/G, kh, kw, O/G)
    return _scatter(x, b, bias, maps, (ho, wo), fmt, underflow, tables_only=True)


def conv2d_input_grad(grad: torch.Tensor, w: torch.Tensor, input_shape: tuple[int, int, int, int], fmt: NumberFormat,
                      stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                      underflow: bool) -> torch.Tensor | None:
    """``quire.conv2d_input_grad(..., mode="none")`` of CPU tensors: the output error grad
    (N, O, Ho, Wo) scattered back through w (O, C/groups, kh, kw) to the input's (N, C, H, W),
    or None where w holds NaR, NaN or infinities."""
    o, cg, kh, kw = w.shape
    _, _, h, wd = input_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    maps = (_tap_map(grad.shape[2], kh, h, lambda u, a: (u * sh + a * dh - ph, 1)),
            _tap_map(grad.shape[3], kw, wd, lambda v, b: (v * sw + b * dw - pw, 1)))
    b = w.reshape(groups, o // groups, cg, kh, kw).permute(0, 1, 3, 4, 2)  # (G, O/G, kh, kw, C/G)
    return _scatter(grad, b, None, maps, (h, wd), fmt, underflow, tables_only=False)
