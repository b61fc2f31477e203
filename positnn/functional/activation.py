"""Activations, dropout and flatten: exact routing where the op allows it (ReLU, the
positive side of leaky ReLU, dropout's mask), one rounding per element elsewhere."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ..policy import LayerPolicy, PolicySpec
from ..stats import LayerStats
from ._common import _record, fresh, resolve, stage


class _ReLU(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(x <= 0)
        return y

    @staticmethod
    def backward(ctx, gy):
        (off,) = ctx.saved_tensors
        return gy.masked_fill(off, 0)


def relu(x: torch.Tensor, policy: PolicySpec = None) -> torch.Tensor:
    """max(x, 0): exact in every format (NaR stays NaR); the error is routed, not rounded."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return _ReLU.apply(x)


class _LeakyReLU(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, slope, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        x_f = F.round(x)
        y = torch.where(x_f > 0, x_f, F.mul(x_f, F.constant(slope)))
        _record(stats, "forward", y, F)
        ctx.save_for_backward(x_f > 0)
        ctx.slope, ctx.lp, ctx.stats = slope, lp, stats
        return y

    @staticmethod
    def backward(ctx, gy):
        (pos,) = ctx.saved_tensors
        B = stage(ctx.lp, "backward")
        s_b = B.constant(ctx.slope)
        g = B.round(gy)
        gx = torch.where(pos, g, B.mul(g, s_b))
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, policy: PolicySpec = None, *,
               stats: LayerStats | None = None) -> torch.Tensor:
    """x for x > 0, else slope * x rounded in F (the slope itself rounded to F); the
    backward multiplies the error by the slope rounded to B."""
    return _LeakyReLU.apply(x, float(negative_slope), resolve(policy), stats)


class _Smooth(torch.autograd.Function):
    """sigmoid and tanh: y = f(x) faithfully rounded in F; dL/dx = gy * f'(x) in B, with
    f' from y by one fused multiply-add (y - y*y, 1 - y*y)."""

    @staticmethod
    @fresh
    def forward(ctx, x, kind: str, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        y = getattr(F, kind)(F.round(x))
        _record(stats, "forward", y, F)
        ctx.save_for_backward(y)
        ctx.kind, ctx.lp, ctx.stats = kind, lp, stats
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        B = stage(ctx.lp, "backward")
        y_b = B.round(y)
        deriv = B.fma(-y_b, y_b, y_b if ctx.kind == "sigmoid" else 1.0)
        gx = B.mul(B.round(gy), deriv)
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None


def sigmoid(x: torch.Tensor, policy: PolicySpec = None, *, stats: LayerStats | None = None) -> torch.Tensor:
    """Logistic sigmoid in F (Posit.sigmoid: evaluated in float64, rounded once);
    backward gy * (y - y*y) in B, the bracket as one fma."""
    return _Smooth.apply(x, "sigmoid", resolve(policy), stats)


def tanh(x: torch.Tensor, policy: PolicySpec = None, *, stats: LayerStats | None = None) -> torch.Tensor:
    """tanh in F (evaluated in float64, rounded once); backward gy * (1 - y*y) in B, the
    bracket as one fma."""
    return _Smooth.apply(x, "tanh", resolve(policy), stats)


class _Dropout(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, p, lp: LayerPolicy, generator):
        F = stage(lp, "forward")
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
        scale = 1.0 / (1.0 - p)
        s_f = F.constant(scale)
        x_f = F.round(x)
        y = F.mul(x_f, keep.to(x_f.dtype) * s_f)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.lp = scale, lp
        return y

    @staticmethod
    def backward(ctx, gy):
        (keep,) = ctx.saved_tensors
        B = stage(ctx.lp, "backward")
        s_b = B.constant(ctx.scale)
        g = B.round(gy)
        return B.mul(g, keep.to(g.dtype) * s_b), None, None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, policy: PolicySpec = None, *,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout: kept elements times 1/(1-p) rounded to F (one rounding per
    element); the backward applies the same mask and the scale rounded to B. The mask
    comes from ``generator`` (torch's default generator when None); with float F and B
    stages and no generator this is ``torch.nn.functional.dropout`` itself."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    lp = resolve(policy)
    if stage(lp, "forward").native and stage(lp, "backward").native and generator is None:
        return TF.dropout(x, p, True)  # float stages: torch's own dropout, same random stream
    return _Dropout.apply(x, float(p), lp, generator)


def flatten(x: torch.Tensor, start_dim: int = 1, end_dim: int = -1) -> torch.Tensor:
    """Reshape only: no arithmetic, so no format is involved."""
    return torch.flatten(x, start_dim, end_dim)
