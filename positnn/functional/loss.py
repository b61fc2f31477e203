"""The loss stage L: log_softmax, cross entropy and mean squared error, with the loss
gradient's scale announced to the layers (``positnn.reduction``)."""

from __future__ import annotations

import torch

from .. import distributed, reduction
from ..policy import LayerPolicy, PolicySpec
from ._common import _batch, fresh, resolve, stage


def _softmax_parts(x: torch.Tensor, dim: int, lp: LayerPolicy):
    """z = x - max, e = exp(z), s = L-quire sum of e (keepdim), all in L."""
    L = stage(lp, "loss")
    x_l = L.round(x)
    z = L.sub(x_l, x_l.amax(dim, keepdim=True))
    e = L.exp(z)
    return z, e, L.sum(e, dim, keepdim=True)


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, dim, lp: LayerPolicy):
        L = stage(lp, "loss")
        z, _, s = _softmax_parts(x, dim, lp)
        y = L.sub(z, L.log(s))
        ctx.save_for_backward(y)
        ctx.dim, ctx.lp = dim, lp
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        L = stage(ctx.lp, "loss")
        g = L.round(gy)
        return L.fma(-L.exp(y), L.sum(g, ctx.dim, keepdim=True), g), None, None


def log_softmax(x: torch.Tensor, dim: int = -1, policy: PolicySpec = None) -> torch.Tensor:
    """log_softmax in L: z = x - max, y = z - log(sum exp z) with the sum in an L quire;
    backward gy - softmax * sum(gy) as one fma per element."""
    return _LogSoftmax.apply(x, dim, resolve(policy))


def _loss_grad_factor(lp: LayerPolicy, gy: torch.Tensor, count: int, batch: int) -> float:
    """The factor of the per-element loss gradient: the upstream gradient times the loss
    scale, over ``count`` under the "mean" reduction, over ``count / batch`` under
    "positnn" (the gradient is left N times the true one). Announces to the layers how
    much larger than the true gradient that makes it (see ``positnn.reduction``)."""
    positnn = lp.grad_reduction == "positnn"
    reduction.announce(lp.loss_scale * (batch if positnn else 1))
    f = float(gy) * lp.loss_scale
    return f / (count / batch) if positnn else f / count


# How the target-class term of the cross-entropy gradient, p_t - 1 = (e_t - s) / s, is
# rounded: "fam" as PositNN (CrossEntropyLoss.hpp, derivative()): (e_t - s) * (1/s) in one
# fused add-multiply, 1/s rounded to L first; "divide": round(e_t / s), then - 1 rounded.
CE_TARGET_GRADS = ("fam", "divide")


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, target, lp: LayerPolicy, target_grad: str):
        L = stage(lp, "loss")
        z, e, s = _softmax_parts(x, 1, lp)
        z_t = z.gather(1, target.unsqueeze(1))
        per_sample = L.sub(L.log(s), z_t).reshape(-1)
        # The global batch in a distributed run: the loss and its announced factor are those
        # of one process over the whole batch (positnn.distributed).
        (n,) = distributed.global_counts(per_sample.shape[0])
        loss = L.div(distributed.batch_sum(L, per_sample, 0), float(n))
        ctx.save_for_backward(e, s, target)
        ctx.lp, ctx.n, ctx.target_grad = lp, n, target_grad
        return loss

    @staticmethod
    def backward(ctx, gy):
        e, s, target = ctx.saved_tensors
        lp = ctx.lp
        L = stage(lp, "loss")
        softmax = L.div(e, s)
        idx = target.unsqueeze(1)
        if ctx.target_grad == "fam":
            # One rounding of (e_t - s) * (1/s), as PositNN, not two (round(e_t / s) - 1).
            g_t = L.fam(e.gather(1, idx), -s, L.div(1.0, s))
        else:
            g_t = L.sub(softmax.gather(1, idx), 1.0)
        g = softmax.scatter(1, idx, g_t)  # softmax - onehot
        factor = _loss_grad_factor(lp, gy, ctx.n, ctx.n)
        if factor != 1.0:
            g = L.mul(g, factor)
        return g, None, None, None


def cross_entropy(x: torch.Tensor, target: torch.Tensor, policy: PolicySpec = None, *,
                  target_grad: str = "fam") -> torch.Tensor:
    """Mean cross entropy of logits (N, C) and class indices (N,), in L.

    Softmax as exp(x - max) with the sum in an L quire; the loss value (mean of
    log(sum) - z_target, the sum in a quire) is for reporting. The gradient is softmax -
    onehot in L: e_k / s for the other classes and, for the target class, PositNN's
    (e_t - s) * (1/s) with one rounding (``target_grad="fam"``, see :mod:`positnn.fam`) or
    round(e_t / s) - 1 (``"divide"``); unscaled under the "positnn" reduction (the layers
    divide by N), divided by N under "mean", times the upstream gradient and the static
    loss scale.
    """
    if x.dim() != 2 or target.dim() != 1 or target.dtype.is_floating_point:
        raise ValueError(f"cross_entropy expects logits (N, C) and int class indices (N,), got {tuple(x.shape)} "
                         f"and {tuple(target.shape)} {target.dtype}")
    if target_grad not in CE_TARGET_GRADS:
        raise ValueError(f"target_grad must be one of {CE_TARGET_GRADS}, got {target_grad!r}")
    return _CrossEntropy.apply(x, target, resolve(policy), target_grad)


class _MSE(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, target, lp: LayerPolicy):
        L = stage(lp, "loss")
        d = L.sub(L.round(x), L.round(target))
        flat = d.reshape(1, -1)
        ctx.count, ctx.batch = distributed.global_counts(d.numel(), _batch(d))
        loss = L.div(distributed.batch_matmul(L, flat, flat.transpose(0, 1)).reshape(()), float(ctx.count))
        ctx.save_for_backward(d)
        ctx.lp = lp
        return loss

    @staticmethod
    def backward(ctx, gy):
        (d,) = ctx.saved_tensors
        lp = ctx.lp
        # torch's mean gradient is 2 d / numel; "positnn" multiplies it by N (2 d / D).
        factor = 2.0 * _loss_grad_factor(lp, gy, ctx.count, ctx.batch)
        g = d if factor == 1.0 else stage(lp, "loss").mul(d, factor)
        return g, None, None


def mse_loss(x: torch.Tensor, target: torch.Tensor, policy: PolicySpec = None) -> torch.Tensor:
    """Mean squared error in L: the sum of squares in one L quire, divided by the element
    count. The gradient is 2 (x - target) / numel ("mean") or times N ("positnn")."""
    if x.shape != target.shape:
        raise ValueError(f"mse_loss needs equal shapes, got {tuple(x.shape)} and {tuple(target.shape)}")
    return _MSE.apply(x, target, resolve(policy))
