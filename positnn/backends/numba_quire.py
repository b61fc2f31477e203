"""The quire's kernels of the numba backend: span scans, slicing and the exact
recombination with the final rounding (``positnn.kernels.slicing`` and ``accumulate``),
on host tensors, for posits and binary floats alike (the format's ``_accumulate_params``). ``positnn.quire`` reaches them through the backend seam; the Triton
backend has the same entry points on the device (``positnn.backends.triton.quire_ops``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels import accumulate as acc
from ..kernels import slicing

if TYPE_CHECKING:
    from ..floatformat import Float
    from ..format import Posit

_NO_BIAS = torch.empty(0, dtype=torch.float64)


def _bias(bias: torch.Tensor | None) -> torch.Tensor:
    return _NO_BIAS if bias is None else bias.detach().cpu().double().reshape(-1).contiguous()


def scan_rows(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(copy, top, low) of the rows of ``flat`` (R, K), as ``slicing.scan_rows``: a float64
    copy (``flat`` itself if it is float64), max|x[r]| < 2**top[r], low[r] the lowest bit."""
    flat = flat.contiguous()
    top = torch.empty(flat.shape[0], dtype=torch.int64)
    low = torch.empty(flat.shape[0], dtype=torch.int64)
    copy = flat if flat.dtype == torch.float64 else torch.empty(flat.shape, dtype=torch.float64)
    slicing.scan_rows(flat.numpy(), top.numpy(), low.numpy(), copy.numpy(), copy is not flat)
    return copy, top, low


def row_extent(top: torch.Tensor, low: torch.Tensor) -> tuple[int, int, int]:
    """(highest top, lowest low, widest span) over the used rows of a scan, (0, 0, -1)
    when no row holds a nonzero finite entry (``slicing.row_extent``)."""
    hi, lo, span = slicing.row_extent(top.numpy(), low.numpy())
    return int(hi), int(lo), int(span)


def global_span(flat: torch.Tensor) -> tuple[int, int, int]:
    """(top, low, nonfinite) over a whole tensor (``slicing.global_span``)."""
    t, b, bad = slicing.global_span(flat.detach().cpu().reshape(-1).contiguous().numpy())
    return int(t), int(b), int(bad)


def split_rows(x: torch.Tensor, top: torch.Tensor, w: int, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Exact slices (B, S, R, K) of the float64 rows x (B*R, K) (``slicing.split_rows``)."""
    out = torch.empty(shape, dtype=torch.float64)
    slicing.split_rows(x.contiguous().numpy(), top.contiguous().numpy(), w, out.numpy())
    return out


def split_flat(x: torch.Tensor, top: int, w: int, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Exact slices (count, numel) of a float32 or float64 tensor below 2**top
    (``slicing.split_flat``), written in ``dtype`` (which must hold each slice exactly)."""
    out = torch.empty((count, x.numel()), dtype=dtype)
    slicing.split_flat(x.reshape(-1).contiguous().numpy(), top, w, out.numpy())
    return out


def round_flat(G: torch.Tensor, fmt: Posit | Float, underflow: bool) -> torch.Tensor:
    """round(G) element by element, G exact float64 (``accumulate.round_flat``)."""
    G = G.contiguous()
    out = torch.empty(G.shape, dtype=fmt.dtype)
    acc.round_flat(G.view(-1).numpy(), out.view(-1).numpy(), fmt._accumulate_params(underflow))
    return out


def round_sum(G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit | Float, underflow: bool) -> torch.Tensor:
    """round(G + bias), G (B, M, N) exact float64 (``accumulate.round_sum``)."""
    G = G.contiguous()
    out = torch.empty(G.shape, dtype=fmt.dtype)
    acc.round_sum(G.numpy(), _bias(bias).numpy(), bias_on_rows, out.numpy(), fmt._accumulate_params(underflow))
    return out


def round_terms(G: torch.Tensor, P: int, Q: int, bias: torch.Tensor | None, fmt: Posit | Float, underflow: bool) -> torch.Tensor:
    """round(sum of the P x Q slice products + bias), exactly (``accumulate.round_terms``)."""
    nb, PM, QN = G.shape
    out = torch.empty((nb, PM // P, QN // Q), dtype=fmt.dtype)
    acc.round_terms(G.contiguous().numpy(), P, Q, _bias(bias).numpy(), out.numpy(), fmt._accumulate_params(underflow))
    return out


def round_stack(G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit | Float, underflow: bool) -> torch.Tensor:
    """round(sum_t G[t] + bias), exactly (``accumulate.round_stack``)."""
    out = torch.empty(G.shape[1:], dtype=fmt.dtype)
    acc.round_stack(G.contiguous().numpy(), _bias(bias).numpy(), bias_on_rows, out.numpy(), fmt._accumulate_params(underflow))
    return out
