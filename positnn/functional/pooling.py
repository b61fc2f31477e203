"""Max and average pooling: selection and routing are exact in every format; window sums
and overlapping-window gradients go through one quire each."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ..policy import LayerPolicy, PolicySpec
from ..stage import Stage
from ..stats import LayerStats
from ._common import IntPair, _pair, _record, fresh, resolve, stage


def _disjoint(kernel, stride, dilation=(1, 1)) -> bool:
    """True when no input element lies in two pooling windows (so routing is exact)."""
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, kernel, stride, padding, dilation, lp: LayerPolicy):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, False)
        ctx.save_for_backward(x, idx)
        ctx.geometry, ctx.lp = (kernel, stride, padding, dilation), lp
        return y

    @staticmethod
    def backward(ctx, gy):
        x, idx = ctx.saved_tensors
        kernel, stride, padding, dilation = ctx.geometry
        route = lambda g: torch.ops.aten.max_pool2d_with_indices_backward(  # noqa: E731
            g, x, kernel, stride, padding, dilation, False, idx)
        if _disjoint(kernel, stride, dilation):
            return route(gy.contiguous()), None, None, None, None, None
        # Overlapping windows: for one kernel offset the windows' targets are distinct, so
        # each offset's routing is exact; the offsets' sum is then one B quire per input.
        wd = x.shape[-1]
        ho, wo = gy.shape[-2:]
        oh = torch.arange(ho).view(-1, 1) * stride[0] - padding[0]
        ow = torch.arange(wo).view(1, -1) * stride[1] - padding[1]
        off_h = (idx // wd - oh) // dilation[0]
        off_w = (idx % wd - ow) // dilation[1]
        parts = [route(torch.where((off_h == i) & (off_w == j), gy, 0).contiguous())
                 for i in range(kernel[0]) for j in range(kernel[1])]
        gx = stage(ctx.lp, "backward").sum(torch.stack(parts), 0)
        return gx, None, None, None, None, None


def max_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
               dilation: IntPair = 1, policy: PolicySpec = None) -> torch.Tensor:
    """Max pooling: the forward selects (exact in any format); the backward routes each
    output error to its argmax, exactly, summing overlapping windows in a B quire."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None else k
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no indices to keep
        return TF.max_pool2d(x, k, s, _pair(padding), _pair(dilation))
    return _MaxPool2d.apply(x, k, s, _pair(padding), _pair(dilation), resolve(policy))


def _fold_exact(cols: torch.Tensor, out_hw, kernel, stride, padding, S: Stage) -> torch.Tensor:
    """Sum the window columns (N, C, kk, L) back onto the input, exactly: one fold per
    kernel offset (no collisions), then one quire of ``S`` over the offsets."""
    n, c, kk, L = cols.shape
    fold = lambda t: TF.fold(t.reshape(n, c * kk, L), out_hw, kernel, stride=stride, padding=padding)  # noqa: E731
    if _disjoint(kernel, stride):
        return fold(cols)
    parts = []
    for t in range(kk):
        only = torch.zeros_like(cols)
        only[:, :, t] = cols[:, :, t]
        parts.append(fold(only))
    return S.sum(torch.stack(parts), 0)


class _AvgPool2d(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, kernel, stride, padding, divisor, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        n, c, h, w = x.shape
        x_f = F.round(x)
        cols = TF.unfold(x_f, kernel, padding=padding, stride=stride)
        ho = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
        wo = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
        s = F.sum(cols.reshape(n, c, kernel[0] * kernel[1], ho * wo), 2)
        y = F.div(s, float(divisor)).reshape(n, c, ho, wo)
        _record(stats, "forward", y, F)
        ctx.geometry, ctx.lp, ctx.stats, ctx.divisor, ctx.in_hw = (kernel, stride, padding), lp, stats, divisor, (h, w)
        return y

    @staticmethod
    def backward(ctx, gy):
        kernel, stride, padding = ctx.geometry
        B = stage(ctx.lp, "backward")
        n, c, ho, wo = gy.shape
        g = B.div(B.round(gy), float(ctx.divisor)).reshape(n, c, 1, ho * wo)
        cols = g.expand(n, c, kernel[0] * kernel[1], ho * wo)
        gx = _fold_exact(cols, ctx.in_hw, kernel, stride, padding, B)
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None, None, None, None


def avg_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
               divisor_override: int | None = None, policy: PolicySpec = None, *,
               stats: LayerStats | None = None) -> torch.Tensor:
    """Average pooling: each window summed in an F quire, then divided by the window size
    in F (zero padding counts, as torch's default ``count_include_pad=True``). Backward:
    the error divided in B and routed back, overlapping windows summed in a B quire."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None else k
    divisor = divisor_override or k[0] * k[1]
    return _AvgPool2d.apply(x, k, s, _pair(padding), divisor, resolve(policy), stats)
