"""Linear and 2-D convolution: every output one F quire dot product with the bias inside;
input errors in B quires, weight gradients in G quires."""

from __future__ import annotations

import torch

from .. import distributed, reduction
from ..policy import LayerPolicy, PolicySpec
from ..stats import LayerStats
from ._common import IntPair, _error_in, _pair, _param_grads, _record, _weight_copies, fresh, resolve, stage


def _save_input(x_f: torch.Tensor, lp: LayerPolicy) -> torch.Tensor:
    """The F input as the G stage will read it (no rounding when F's values are G's)."""
    F, G = stage(lp, "forward"), stage(lp, "gradient")
    return x_f if G.contains(F) else G.round(x_f)


class _Linear(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        x_f = F.round(x)
        y = F.linear(x_f, w_f, b_f)
        _record(stats, "forward", y, F)
        ctx.save_for_backward(_save_input(x_f, lp), w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias = lp, stats, weight, bias
        return y

    @staticmethod
    def backward(ctx, gy):
        x_g, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = stage(lp, "backward"), stage(lp, "gradient")
        gx = gw = gb = None
        d_b = None
        if ctx.needs_input_grad[0]:
            d_b = _error_in(gy, B, stats, "backward")
            gx = B.matmul(d_b, w_b)
            _record(stats, "backward", gx, B)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_g = d_b if (d_b is not None and G == B) else _error_in(gy, G, stats, "gradient")
            d2 = d_g.reshape(-1, d_g.shape[-1])
            x2 = x_g.reshape(-1, x_g.shape[-1])
            div = reduction.divisor()
            if ctx.needs_input_grad[2]:
                # The bias gradient rides in the weight-gradient GEMM as a column of ones:
                # the same G quires, one launch fewer.
                x2 = torch.cat([x2, x2.new_ones(x2.shape[0], 1)], dim=1)
            g = distributed.batch_matmul(G, d2.transpose(0, 1), x2)  # K: the batch rows
            gw, gb = _param_grads([(g[:, :x_g.shape[-1]], ctx.weight if ctx.needs_input_grad[1] else None),
                                   (g[:, -1], ctx.bias if ctx.needs_input_grad[2] else None)], div, lp, stats)
        return gx, gw, gb, None, None, None, None, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    policy: PolicySpec = None,
    *,
    weight_f: torch.Tensor | None = None,
    weight_b: torch.Tensor | None = None,
    bias_f: torch.Tensor | None = None,
    stats: LayerStats | None = None,
) -> torch.Tensor:
    """y = x W^T + b in posits: each output one F quire dot product with the bias inside.

    Backward: input error delta W in B (from the B copy of W), weight and bias gradients in
    a G quire, divided by the batch size in G, added into the O ``.grad``. ``weight_f``,
    ``weight_b`` and ``bias_f`` are the F/B copies (rounded from ``weight`` when omitted).
    """
    lp = resolve(policy)
    w_f, w_b, b_f = _weight_copies(lp, weight, bias, weight_f, weight_b, bias_f)
    return _Linear.apply(x, weight, bias, w_f, w_b, b_f, lp, stats)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    @fresh
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, geometry, lp: LayerPolicy, stats):
        F = stage(lp, "forward")
        x_f = F.round(x)
        y = F.conv2d(x_f, w_f, b_f, *geometry)
        _record(stats, "forward", y, F)
        ctx.save_for_backward(_save_input(x_f, lp), w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias, ctx.geometry = lp, stats, weight, bias, geometry
        return y

    @staticmethod
    def backward(ctx, gy):
        x_g, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = stage(lp, "backward"), stage(lp, "gradient")
        gx = gw = gb = None
        d_b = None
        if ctx.needs_input_grad[0]:
            d_b = _error_in(gy, B, stats, "backward")
            # dL/dx: a transposed convolution, one B quire per input element.
            gx = B.conv2d_input_grad(d_b, w_b, x_g.shape, *ctx.geometry)
            _record(stats, "backward", gx, B)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_g = d_b if (d_b is not None and G == B) else _error_in(gy, G, stats, "gradient")
            div = reduction.divisor()
            if ctx.needs_input_grad[1]:
                # dL/dW: one G quire per weight over all N * Hout * Wout positions.
                gw = distributed.batch_conv2d_weight_grad(G, x_g, d_g, ctx.weight.shape, *ctx.geometry)
            if ctx.needs_input_grad[2]:
                # As PositNN (Conv2d::gradient): each sample's sum over (Hout, Wout) rounded
                # to G, then the sum over the batch rounded again.
                # The batch sum is summed over ranks in a distributed run.
                gb = distributed.batch_sum(G, G.sum(d_g, (2, 3)), 0)
            gw, gb = _param_grads([(gw, ctx.weight if gw is not None else None),
                                   (gb, ctx.bias if gb is not None else None)], div, lp, stats)
        return gx, gw, gb, None, None, None, None, None, None


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    policy: PolicySpec = None,
    *,
    weight_f: torch.Tensor | None = None,
    weight_b: torch.Tensor | None = None,
    bias_f: torch.Tensor | None = None,
    stats: LayerStats | None = None,
) -> torch.Tensor:
    """2-D convolution in posits (as ``torch.nn.functional.conv2d``, numeric padding only).

    Forward: one F quire per output with the bias inside. Backward: the input error is a
    convolution of the dilated, padded output error with the rotated B kernel (one B quire
    per input element); the weight gradient is one G quire per weight over the unfolded
    input (K = N * output positions), divided by N in G and added into the O ``.grad``; the
    bias gradient sums each sample's output positions in a G quire, then those sums.
    """
    lp = resolve(policy)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    w_f, w_b, b_f = _weight_copies(lp, weight, bias, weight_f, weight_b, bias_f)
    return _Conv2d.apply(x, weight, bias, w_f, w_b, b_f, geometry, lp, stats)
