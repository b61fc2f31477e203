"""Exact accumulation (the quire): dot products, matmul, linear, conv2d and sum, rounded once.

Every posit is an integer multiple of a power of two, so a dot product of posits is an
integer sum. ``mode="exact"`` computes it at BLAS speed (Ozaki slicing): each row of ``a``
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
  kept for comparison with frameworks that simulate posits this way.

Inputs are taken as exact real values (posits of any format, or any floats); NaN and +-inf
are NaR and make every output they touch NaR.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .format import Posit
from .kernels import accumulate as acc

MODES = ("exact", "none", "float32", "float64")
# Exact mode handles operand magnitudes in [2**-MAX_BINADE, 2**MAX_BINADE]: every posit of
# a format with max_exponent <= 500 (all es <= 4, and es = 5 up to 17 bits).
MAX_BINADE = 500


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quire mode must be one of {MODES}, got {mode!r}")


def _check_operand(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")
    return x


def _slices(x: torch.Tensor, w: int, name: str) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
    """Split the rows of x (float64, finite) exactly: x = 2**(e - w) * sum_j S_j 2**(-w j).

    Returns the nonzero slices, their levels j, and the row exponents e (|x| < 2**e).
    """
    amax = x.abs().amax(-1, keepdim=True)
    if x.numel() and amax.max() >= 2.0**MAX_BINADE:
        raise ValueError(f"{name} has magnitudes >= 2**{MAX_BINADE}; the exact quire supports [2**-{MAX_BINADE}, 2**{MAX_BINADE})")
    nonzero = x[x != 0]
    if nonzero.numel() and nonzero.abs().min() < 2.0**-MAX_BINADE:
        raise ValueError(f"{name} has nonzero magnitudes < 2**-{MAX_BINADE}; the exact quire supports [2**-{MAX_BINADE}, 2**{MAX_BINADE})")
    e = torch.frexp(amax).exponent
    rest = x * _pow2(w - e)
    slices, levels, level = [], [], 0
    while True:
        s = torch.trunc(rest)
        if s.any():
            slices.append(s)
            levels.append(level)
        rest = (rest - s) * 2.0**w
        level += 1
        if not rest.any():
            break
    if not slices:  # all zero: one zero slice keeps the shapes simple
        slices, levels = [torch.zeros_like(x)], [0]
    return slices, levels, e.squeeze(-1).to(torch.int64)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float64 powers of two for integer tensors k (|k| <= 1022)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _nar_free(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with NaR replaced by 0, mask of NaR)."""
    bad = ~torch.isfinite(x)
    return torch.where(bad, torch.zeros((), dtype=x.dtype), x), bad


def _exact_bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, fmt: Posit, underflow: bool) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) + bias (N,), float64 in, exact, rounded once."""
    nb, M, K = a.shape
    N = b.shape[-1]
    a, a_nar = _nar_free(a)
    bt, b_nar = _nar_free(b.transpose(-1, -2))
    w = (53 - math.ceil(math.log2(max(K, 1)))) // 2
    sa, la, e = _slices(a, w, "a")
    sb, lb, f = _slices(bt, w, "b")
    G = torch.matmul(torch.cat(sa, dim=-2), torch.cat(sb, dim=-2).transpose(-1, -2))
    out = torch.empty((nb, M, N), dtype=fmt.dtype)
    if bias is None:
        bias_v = torch.empty(0, dtype=torch.float64)
        bias_nar = torch.zeros(N, dtype=torch.bool)
    else:
        bias_v, bias_nar = _nar_free(bias.reshape(N))
    acc.round_gemm(
        G.contiguous().numpy(), len(sa), len(sb), torch.tensor(la).numpy(), torch.tensor(lb).numpy(),
        e.contiguous().numpy(), f.contiguous().numpy(), w, bias_v.contiguous().numpy(),
        out.numpy(), fmt.nbits, fmt.es, underflow,
    )
    nar = a_nar.any(-1).unsqueeze(-1) | b_nar.any(-1).unsqueeze(-2) | bias_nar
    return out.masked_fill_(nar, math.nan) if nar.any() else out


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    fmt: Posit,
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
    a3 = a2.detach().cpu().double().expand(*batch, M, K).reshape(-1, M, K)
    b3 = b2.detach().cpu().double().expand(*batch, K, N).reshape(-1, K, N)
    bias64 = None if bias is None else bias.detach().cpu().double().reshape(N)

    if mode == "exact":
        out = _exact_bmm(a3, b3, bias64, fmt, underflow)
    elif mode == "none":
        out = torch.empty((a3.shape[0], M, N), dtype=fmt.dtype)
        no_bias = torch.empty(0, dtype=torch.float64)
        acc.sequential_dot(
            a3.contiguous().numpy(), b3.contiguous().numpy(),
            (no_bias if bias64 is None else bias64).contiguous().numpy(), out.numpy(), fmt.nbits, fmt.es, underflow,
        )
    else:
        dt = torch.float32 if mode == "float32" else torch.float64
        y = torch.matmul(a3.to(dt), b3.to(dt))
        if bias64 is not None:
            y = y + bias64.to(dt)
        out = fmt.round(y, underflow=underflow)

    out = out.reshape(*batch, M, N)
    if squeeze_rows:
        out = out.squeeze(-2)
    if squeeze_cols:
        out = out.squeeze(-1)
    return out.to(device)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, fmt: Posit, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """x @ w.T + bias with x (..., in) and w (out, in), accumulated in one quire per output."""
    return matmul(x, w.transpose(0, 1), fmt, bias=bias, mode=mode, underflow=underflow)


def dot(a: torch.Tensor, b: torch.Tensor, fmt: Posit, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """The dot product of two 1-D tensors, rounded once (a 0-dim tensor)."""
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(f"dot expects 1-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return matmul(a, b, fmt, mode=mode, underflow=underflow)


def sum(x: torch.Tensor, dim: int, fmt: Posit, keepdim: bool = False, *, mode: str = "exact", underflow: bool = False) -> torch.Tensor:
    """The sum of x along ``dim``, accumulated exactly and rounded once."""
    _check_operand(x, "x")
    moved = x.movedim(dim, -1)
    ones = torch.ones(moved.shape[-1], 1, dtype=torch.float64)
    out = matmul(moved, ones, fmt, mode=mode, underflow=underflow).squeeze(-1)
    return out.unsqueeze(dim) if keepdim else out


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: Posit,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    *,
    mode: str = "exact",
    underflow: bool = False,
) -> torch.Tensor:
    """2-D convolution (as torch.nn.functional.conv2d) with one quire per output element.

    x is (N, C, H, W) and w is (O, C // groups, kh, kw); computed as a GEMM over the
    unfolded input (K = C/groups * kh * kw), with the bias inside the quire.
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


class Quire:
    """An incremental exact accumulator: one quire per element of ``shape``.

    The state is a tensor of int64 limbs (``state_dict()``) in units of minpos**2 of
    ``fmt``, as wide as the format's quire plus headroom, so quires can be saved, loaded
    and summed across processes exactly (addition of quires is associative). Adding a
    value that is not a multiple of minpos**2 raises ValueError.
    """

    def __init__(self, fmt: Posit, shape: tuple[int, ...] | torch.Size = ()) -> None:
        self.fmt = fmt
        self.shape = torch.Size(shape)
        self.lsb = -2 * fmt.max_exponent
        nl = (4 * fmt.max_exponent + 64 + 40) // acc.LIMB + 4  # products, 2**64 of carry room
        self.limbs = torch.zeros((self.shape.numel(), nl), dtype=torch.int64)

    def clear(self) -> "Quire":
        """Reset every quire to zero."""
        self.limbs.zero_()
        return self

    def _add_terms(self, *terms: torch.Tensor) -> None:
        for t in terms:
            t = torch.broadcast_to(t.detach().cpu().double(), self.shape).reshape(-1).contiguous()
            if (~torch.isfinite(t)).any():
                raise ValueError("cannot add NaR (NaN or inf) to a quire: its value would be lost")
            bad = acc.quire_add(self.limbs.numpy(), t.numpy(), self.lsb)
            if bad:
                raise ValueError(f"{bad} term(s) are not multiples of minpos**2 of {self.fmt}: not {self.fmt} values")

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

    def to_posit(self, underflow: bool = False) -> torch.Tensor:
        """Round every quire once to ``fmt``."""
        out = torch.empty(self.shape.numel(), dtype=self.fmt.dtype)
        acc.quire_round(self.limbs.numpy(), self.lsb, out.numpy(), self.fmt.nbits, self.fmt.es, underflow)
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

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by ``state_dict`` (same format and shape required)."""
        if Posit.parse(state["format"]) != self.fmt or list(state["shape"]) != list(self.shape):
            raise ValueError(f"quire state is for {state['format']} {state['shape']}, not {self.fmt} {list(self.shape)}")
        self.limbs = state["limbs"].clone()


def _product_error(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """a*b - p exactly (Dekker's TwoProduct with Veltkamp splitting), for float64 tensors."""
    split = 134217729.0  # 2**27 + 1
    ca, cb = split * a, split * b
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl
