"""Batch normalisation over (N, C, *): statistics with quires in F, running statistics in
O, backward in B, affine gradients in G."""

from __future__ import annotations

import torch

from .. import distributed, reduction
from ..policy import LayerPolicy, PolicySpec
from ..stage import Stage
from ..stats import LayerStats
from ._common import _param_grads, _record, _weight_copies, fresh, resolve, stage


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (C, M) with M = N * prod(*)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_channels_first(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n, c = shape[0], shape[1]
    return t.reshape(c, n, *shape[2:]).transpose(0, 1).contiguous()


def _rowdot(a: torch.Tensor, b: torch.Tensor, S: Stage) -> torch.Tensor:
    """sum(a * b, dim=-1) for (C, M) tensors: one quire of ``S`` per row."""
    return S.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).reshape(a.shape[:-1])


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, running_mean, running_var, training, momentum, eps, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        x_f = _channels_first(F.round(x))
        m = x_f.shape[1]
        if training:
            mean = F.div(F.sum(x_f, 1), float(m))
            d = F.sub(x_f, mean[:, None])
            sq = _rowdot(d, d, F)
            var = F.div(sq, float(m))
            if running_mean is not None:
                with torch.no_grad():  # running statistics: state, kept in O like the weights
                    R = stage(lp, "optimizer")
                    unbiased = R.div(sq, float(max(m - 1, 1)))
                    running_mean.copy_(R.fma(momentum, R.sub(mean, running_mean), running_mean))
                    running_var.copy_(R.fma(momentum, R.sub(unbiased, running_var), running_var))
        else:
            mean, var = F.round(running_mean), F.round(running_var)
            d = F.sub(x_f, mean[:, None])
        inv_std = F.div(1.0, F.sqrt(F.add(var, eps)))
        xhat = F.mul(d, inv_std[:, None])
        y = xhat if w_f is None else F.fma(w_f[:, None], xhat, b_f[:, None])
        _record(stats, "forward", y, F)
        ctx.save_for_backward(xhat, inv_std, w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias, ctx.training, ctx.shape = lp, stats, weight, bias, training, x.shape
        return _from_channels_first(y, x.shape)

    @staticmethod
    def backward(ctx, gy):
        xhat, inv_std, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = stage(lp, "backward"), stage(lp, "gradient")
        g = _channels_first(gy)
        gx = gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_g, xhat_g = G.round(g), G.round(xhat)
            div = reduction.divisor()
            # Sums over the batch (M = N x positions): summed over ranks in a distributed run.
            gw = distributed.batch_matmul(G, g_g.unsqueeze(-2), xhat_g.unsqueeze(-1)).reshape(-1)  # rows of g . xhat
            gb = distributed.batch_sum(G, g_g, 1)
            gw, gb = _param_grads([(gw, ctx.weight if ctx.needs_input_grad[1] else None),
                                   (gb, ctx.bias if ctx.needs_input_grad[2] else None)], div, lp, stats)
        if ctx.needs_input_grad[0]:
            g_b, xhat_b, inv_b = B.round(g), B.round(xhat), B.round(inv_std)
            dxhat = g_b if w_b is None else B.mul(g_b, w_b[:, None])
            if ctx.training:
                m = float(g.shape[1])
                a = B.div(B.sum(dxhat, 1), m)
                b = B.div(_rowdot(dxhat, xhat_b, B), m)
                dxhat = B.fma(-xhat_b, b[:, None], B.sub(dxhat, a[:, None]))
            gx = _from_channels_first(B.mul(dxhat, inv_b[:, None]), ctx.shape)
            _record(stats, "backward", gx, B)
        return (gx, gw, gb) + (None,) * 10


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    policy: PolicySpec = None,
    *,
    weight_f: torch.Tensor | None = None,
    weight_b: torch.Tensor | None = None,
    bias_f: torch.Tensor | None = None,
    stats: LayerStats | None = None,
) -> torch.Tensor:
    """Batch normalisation over (N, C, *) in F, statistics with quires.

    Training: mean = quire sum / M, var = quire sum of (x - mean)^2 / M (biased, as torch
    normalises), y = gamma * (x - mean) / sqrt(var + eps) + beta with the last step one
    fma; the running statistics are updated in O (unbiased variance, as torch). Backward in
    B with quire sums; gamma and beta gradients in G quires, divided by N, added into O.
    """
    lp = resolve(policy)
    if training and x.numel() <= x.shape[1]:
        # As torch: the batch variance of one value is 0, which would silently zero the output.
        raise ValueError(f"batch_norm needs more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in eval mode needs running_mean and running_var")
    w_f, w_b, b_f = _weight_copies(lp, weight, bias, weight_f, weight_b, bias_f)
    if w_f is not None and b_f is None:
        b_f = torch.zeros_like(w_f)
    return _BatchNorm.apply(x, weight, bias, w_f, w_b, b_f, running_mean, running_var, training, momentum, eps, lp, stats)
