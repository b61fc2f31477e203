"""Autograd ops whose forward AND backward run in posit arithmetic, stage by stage.

Each op is one ``torch.autograd.Function``; its forward computes in the layer's F format,
its backward propagates the error in B and forms weight gradients in G, every dot product
going through ``positnn.quire`` in the policy's quire mode (PositNN's semantics, notes
section 4). Loss ops compute in L. A stage that is ``None`` is plain float: the op then
uses ordinary torch arithmetic, so with every stage float each op equals its torch
counterpart (up to float reassociation) and float baselines run through the same code.

Parameter gradients: the G result (rounded once from the G quire) is divided in G by the
factor the loss announced for this backward pass (``positnn.reduction``): the batch size N
for a positnn loss under the "positnn" reduction, times the policy's static loss scale;
1 for torch's losses or a custom one, whose gradient is already the true one. So ``.grad``
is always the gradient of the loss the user wrote, rounded to O. The G result is then
added into the parameter's O ``.grad``: set to O.round(g) when ``.grad`` is None
(returned through autograd, so ``torch.autograd.grad`` works), else updated in place as
``grad = O.add(grad, g)`` with one rounding. A parameter shared by several layers (tied
weights, tagged ``posit_shared`` by ``convert``) always takes the in-place path, so its
contributions are summed in O one rounding each, never in the float carrier.

Functional callers pass a :class:`~positnn.policy.LayerPolicy` (or a Policy, resolved for
the root, or None for float); modules also pass their cached F/B weight copies and their
NaR counters (``stats``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as TF

from . import quire, reduction
from .format import Posit
from .policy import LayerPolicy, Policy, is_subformat, maybe_round, round_scalar
from .stats import LayerStats

PolicyLike = LayerPolicy | Policy | None
IntPair = int | tuple[int, int]


# --------------------------------------------------------------------------- helpers
class _FloatOps:
    """The float "format": the same method names as Posit's arithmetic, as torch ops."""

    add = staticmethod(lambda a, b: a + b)
    sub = staticmethod(lambda a, b: a - b)
    mul = staticmethod(lambda a, b: a * b)
    div = staticmethod(lambda a, b: a / b)
    fma = staticmethod(lambda a, b, c: a * b + c)
    sqrt = staticmethod(torch.sqrt)
    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)
    sigmoid = staticmethod(torch.sigmoid)
    tanh = staticmethod(torch.tanh)


FLOAT = _FloatOps()


def ops(fmt: Posit | None) -> Any:
    """The arithmetic of a stage: the Posit itself (correctly rounded ops) or plain torch."""
    return FLOAT if fmt is None else fmt


def resolve(policy: PolicyLike) -> LayerPolicy:
    """A LayerPolicy from a LayerPolicy, a Policy (its root-level resolution) or None."""
    if policy is None:
        return LayerPolicy()
    if isinstance(policy, Policy):
        return policy.for_layer("")
    if isinstance(policy, LayerPolicy):
        return policy
    raise TypeError(f"policy must be a LayerPolicy, Policy or None, got {type(policy).__name__}")


def _mm(a: torch.Tensor, b: torch.Tensor, fmt: Posit | None, lp: LayerPolicy, bias: torch.Tensor | None = None) -> torch.Tensor:
    if fmt is None:
        y = torch.matmul(a, b)
        return y if bias is None else y + bias
    return quire.matmul(a, b, fmt, bias=bias, mode=lp.quire, underflow=lp.underflow)


def _sum(x: torch.Tensor, dim: int, fmt: Posit | None, lp: LayerPolicy, keepdim: bool = False) -> torch.Tensor:
    if fmt is None:
        return x.sum(dim, keepdim=keepdim)
    return quire.sum(x, dim, fmt, keepdim, mode=lp.quire, underflow=lp.underflow)


def _rowdot(a: torch.Tensor, b: torch.Tensor, fmt: Posit | None, lp: LayerPolicy) -> torch.Tensor:
    """sum(a * b, dim=-1) for (C, M) tensors: one quire per row."""
    return _mm(a.unsqueeze(-2), b.unsqueeze(-1), fmt, lp).reshape(a.shape[:-1])


def _conv(x, w, b, fmt, lp, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    if fmt is None:
        return TF.conv2d(x, w, b, stride, padding, dilation, groups)
    return quire.conv2d(x, w, b, fmt, stride, padding, dilation, groups, mode=lp.quire, underflow=lp.underflow)


def _record(stats: LayerStats | None, stage: str, t: torch.Tensor | None, fmt: Posit | None) -> None:
    if stats is not None and t is not None:
        stats.record(stage, t, fmt)


def _error_in(gy: torch.Tensor, fmt: Posit | None, lp: LayerPolicy, stats: LayerStats | None, stage: str) -> torch.Tensor:
    """The incoming error converted to a stage format, counting saturation there (where a
    loss scale that is too large shows first)."""
    d = maybe_round(gy, fmt, lp)
    _record(stats, stage, d, fmt)
    return d


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _param_grads(parts: list[tuple[torch.Tensor, torch.Tensor | None]], divisor: float, lp: LayerPolicy,
                 stats: LayerStats | None) -> list[torch.Tensor | None]:
    """Finish a layer's G-quire parameter gradients [(g, param), ...] in one go (one
    division and at most one O rounding for all of them): divide by ``divisor`` in G, then
    add into each parameter's O ``.grad``. Returns, per parameter, what autograd should
    accumulate (None where the O sum was done in place, or where the parameter is None)."""
    wanted = [p is not None for _, p in parts]
    parts = [(g, p) for g, p in parts if p is not None]
    if not parts:
        return [None] * len(wanted)
    G, O = lp.gradient, lp.optimizer
    flat = torch.cat([g.reshape(-1) for g, _ in parts]) if len(parts) > 1 else parts[0][0].reshape(-1)
    _record(stats, "gradient", flat, G)  # the quire results, before the division shrinks them
    if divisor != 1:
        flat = ops(G).div(flat, float(divisor))
    pieces = flat.split([p.numel() for _, p in parts])
    if O is None:
        return _spread([g.view(p.shape) for g, (_, p) in zip(pieces, parts)], wanted)
    # Into an empty O buffer: O.round(g), which is only a cast when G's values are O's.
    flat_o = flat.to(O.dtype) if is_subformat(G, O) else maybe_round(flat, O, lp)
    out: list[torch.Tensor | None] = []
    for g_g, g_o, (_, p) in zip(pieces, flat_o.split([p.numel() for _, p in parts]), parts):
        shared = getattr(p, "posit_shared", False)
        if p.grad is None and not shared:
            out.append(g_o.view(p.shape))
            continue
        with torch.no_grad():  # into an existing O buffer: one rounding of the exact sum
            if p.grad is None:
                p.grad = g_o.view(p.shape).clone()
            else:
                p.grad.copy_(O.add(p.grad, g_g.view(p.shape)))
        _record(stats, "optimizer", p.grad, O)
        out.append(None)
    return _spread(out, wanted)


def _spread(values: list, wanted: list[bool]) -> list:
    """Put ``values`` at the wanted positions, None elsewhere."""
    it = iter(values)
    return [next(it) if w else None for w in wanted]


def _batch(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


# --------------------------------------------------------------------------- linear, conv
class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, lp: LayerPolicy, stats):
        F, G = lp.forward, lp.gradient
        x_f = maybe_round(x, F, lp)
        if F is None:
            y = TF.linear(x_f, w_f, b_f)
        else:
            y = quire.linear(x_f, w_f, b_f, F, mode=lp.quire, underflow=lp.underflow)
        _record(stats, "forward", y, F)
        x_g = x_f if is_subformat(F, G) else maybe_round(x_f, G, lp)
        ctx.save_for_backward(x_g, w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias = lp, stats, weight, bias
        return y

    @staticmethod
    def backward(ctx, gy):
        x_g, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = lp.backward, lp.gradient
        gx = gw = gb = None
        d_b = None
        if ctx.needs_input_grad[0]:
            d_b = _error_in(gy, B, lp, stats, "backward")
            gx = _mm(d_b, w_b, B, lp)
            _record(stats, "backward", gx, B)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_g = d_b if (d_b is not None and G == B) else _error_in(gy, G, lp, stats, "gradient")
            d2 = d_g.reshape(-1, d_g.shape[-1])
            x2 = x_g.reshape(-1, x_g.shape[-1])
            div = reduction.divisor()
            if ctx.needs_input_grad[2]:
                # The bias gradient rides in the weight-gradient GEMM as a column of ones:
                # the same G quires, one launch fewer.
                x2 = torch.cat([x2, x2.new_ones(x2.shape[0], 1)], dim=1)
            g = _mm(d2.transpose(0, 1), x2, G, lp)
            gw, gb = _param_grads([(g[:, :x_g.shape[-1]], ctx.weight if ctx.needs_input_grad[1] else None),
                                   (g[:, -1], ctx.bias if ctx.needs_input_grad[2] else None)], div, lp, stats)
        return gx, gw, gb, None, None, None, None, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    policy: PolicyLike = None,
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
    w_f = maybe_round(weight.detach(), lp.forward, lp) if weight_f is None else weight_f
    w_b = maybe_round(weight.detach(), lp.backward, lp) if weight_b is None else weight_b
    b_f = None if bias is None else (maybe_round(bias.detach(), lp.forward, lp) if bias_f is None else bias_f)
    return _Linear.apply(x, weight, bias, w_f, w_b, b_f, lp, stats)


def _conv_input_grad(d, w, x_shape, stride, padding, dilation, groups, fmt, lp) -> torch.Tensor:
    """dL/dx of a convolution: a transposed convolution, one B quire per input element."""
    if fmt is None:
        return torch.nn.grad.conv2d_input(tuple(x_shape), w, d, stride, padding, dilation, groups)
    return quire.conv2d_input_grad(d, w, x_shape, fmt, stride, padding, dilation, groups,
                                   mode=lp.quire, underflow=lp.underflow)


def _conv_weight_grad(x, d, w_shape, stride, padding, dilation, groups, fmt, lp) -> torch.Tensor:
    """dL/dW of a convolution: one G quire per weight over all N * Hout * Wout positions."""
    if fmt is None:
        return torch.nn.grad.conv2d_weight(x, tuple(w_shape), d, stride, padding, dilation, groups)
    return quire.conv2d_weight_grad(x, d, w_shape, fmt, stride, padding, dilation, groups,
                                    mode=lp.quire, underflow=lp.underflow)


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, geometry, lp: LayerPolicy, stats):
        F, G = lp.forward, lp.gradient
        stride, padding, dilation, groups = geometry
        x_f = maybe_round(x, F, lp)
        y = _conv(x_f, w_f, b_f, F, lp, stride, padding, dilation, groups)
        _record(stats, "forward", y, F)
        x_g = x_f if is_subformat(F, G) else maybe_round(x_f, G, lp)
        ctx.save_for_backward(x_g, w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias, ctx.geometry = lp, stats, weight, bias, geometry
        return y

    @staticmethod
    def backward(ctx, gy):
        x_g, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = lp.backward, lp.gradient
        stride, padding, dilation, groups = ctx.geometry
        gx = gw = gb = None
        d_b = None
        if ctx.needs_input_grad[0]:
            d_b = _error_in(gy, B, lp, stats, "backward")
            gx = _conv_input_grad(d_b, w_b, x_g.shape, stride, padding, dilation, groups, B, lp)
            _record(stats, "backward", gx, B)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_g = d_b if (d_b is not None and G == B) else _error_in(gy, G, lp, stats, "gradient")
            div = reduction.divisor()
            gw = gb = None
            if ctx.needs_input_grad[1]:
                gw = _conv_weight_grad(x_g, d_g, ctx.weight.shape, stride, padding, dilation, groups, G, lp)
            if ctx.needs_input_grad[2]:
                gb = _sum(d_g.transpose(0, 1).reshape(d_g.shape[1], -1), 1, G, lp)  # over (N, Hout, Wout)
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
    policy: PolicyLike = None,
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
    input (K = N * output positions), divided by N in G and added into the O ``.grad``.
    """
    lp = resolve(policy)
    geometry = (_pair(stride), _pair(padding), _pair(dilation), int(groups))
    w_f = maybe_round(weight.detach(), lp.forward, lp) if weight_f is None else weight_f
    w_b = maybe_round(weight.detach(), lp.backward, lp) if weight_b is None else weight_b
    b_f = None if bias is None else (maybe_round(bias.detach(), lp.forward, lp) if bias_f is None else bias_f)
    return _Conv2d.apply(x, weight, bias, w_f, w_b, b_f, geometry, lp, stats)


# --------------------------------------------------------------------------- pooling
def _disjoint(kernel, stride, dilation=(1, 1)) -> bool:
    """True when no input element lies in two pooling windows (so routing is exact)."""
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
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
        lp = ctx.lp
        wd = x.shape[-1]
        ho, wo = gy.shape[-2:]
        oh = torch.arange(ho).view(-1, 1) * stride[0] - padding[0]
        ow = torch.arange(wo).view(1, -1) * stride[1] - padding[1]
        off_h = (idx // wd - oh) // dilation[0]
        off_w = (idx % wd - ow) // dilation[1]
        parts = [route(torch.where((off_h == i) & (off_w == j), gy, 0).contiguous())
                 for i in range(kernel[0]) for j in range(kernel[1])]
        gx = _sum(torch.stack(parts), 0, lp.backward, lp)
        return gx, None, None, None, None, None


def max_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
               dilation: IntPair = 1, policy: PolicyLike = None) -> torch.Tensor:
    """Max pooling: the forward selects (exact in any format); the backward routes each
    output error to its argmax, exactly, summing overlapping windows in a B quire."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None else k
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: no indices to keep
        return TF.max_pool2d(x, k, s, _pair(padding), _pair(dilation))
    return _MaxPool2d.apply(x, k, s, _pair(padding), _pair(dilation), resolve(policy))


def _fold_exact(cols: torch.Tensor, out_hw, kernel, stride, padding, fmt, lp) -> torch.Tensor:
    """Sum the window columns (N, C, kk, L) back onto the input, exactly: one fold per
    kernel offset (no collisions), then one quire over the offsets."""
    n, c, kk, L = cols.shape
    fold = lambda t: TF.fold(t.reshape(n, c * kk, L), out_hw, kernel, stride=stride, padding=padding)  # noqa: E731
    if _disjoint(kernel, stride):
        return fold(cols)
    parts = []
    for t in range(kk):
        only = torch.zeros_like(cols)
        only[:, :, t] = cols[:, :, t]
        parts.append(fold(only))
    return _sum(torch.stack(parts), 0, fmt, lp)


class _AvgPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, divisor, lp: LayerPolicy, stats):
        F = lp.forward
        n, c, h, w = x.shape
        x_f = maybe_round(x, F, lp)
        cols = TF.unfold(x_f, kernel, padding=padding, stride=stride)
        ho = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
        wo = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
        s = _sum(cols.reshape(n, c, kernel[0] * kernel[1], ho * wo), 2, F, lp)
        y = ops(F).div(s, float(divisor)).reshape(n, c, ho, wo)
        _record(stats, "forward", y, F)
        ctx.geometry, ctx.lp, ctx.stats, ctx.divisor, ctx.in_hw = (kernel, stride, padding), lp, stats, divisor, (h, w)
        return y

    @staticmethod
    def backward(ctx, gy):
        lp, (kernel, stride, padding) = ctx.lp, ctx.geometry
        B = lp.backward
        n, c, ho, wo = gy.shape
        g = ops(B).div(maybe_round(gy, B, lp), float(ctx.divisor)).reshape(n, c, 1, ho * wo)
        cols = g.expand(n, c, kernel[0] * kernel[1], ho * wo)
        gx = _fold_exact(cols, ctx.in_hw, kernel, stride, padding, B, lp)
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None, None, None, None


def avg_pool2d(x: torch.Tensor, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
               divisor_override: int | None = None, policy: PolicyLike = None, *,
               stats: LayerStats | None = None) -> torch.Tensor:
    """Average pooling: each window summed in an F quire, then divided by the window size
    in F (zero padding counts, as torch's default ``count_include_pad=True``). Backward:
    the error divided in B and routed back, overlapping windows summed in a B quire."""
    k = _pair(kernel_size)
    s = _pair(stride) if stride is not None else k
    divisor = divisor_override or k[0] * k[1]
    return _AvgPool2d.apply(x, k, s, _pair(padding), divisor, resolve(policy), stats)


# --------------------------------------------------------------------------- activations
class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(x <= 0)
        return y

    @staticmethod
    def backward(ctx, gy):
        (off,) = ctx.saved_tensors
        return gy.masked_fill(off, 0)


def relu(x: torch.Tensor, policy: PolicyLike = None) -> torch.Tensor:
    """max(x, 0): exact in every format (NaR stays NaR); the error is routed, not rounded."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.relu(x)
    return _ReLU.apply(x)


class _LeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slope, lp: LayerPolicy, stats):
        F = lp.forward
        x_f = maybe_round(x, F, lp)
        s_f = round_scalar(slope, F)
        y = torch.where(x_f > 0, x_f, ops(F).mul(x_f, s_f))
        _record(stats, "forward", y, F)
        ctx.save_for_backward(x_f > 0)
        ctx.slope, ctx.lp, ctx.stats = slope, lp, stats
        return y

    @staticmethod
    def backward(ctx, gy):
        (pos,) = ctx.saved_tensors
        B = ctx.lp.backward
        s_b = round_scalar(ctx.slope, B)
        g = maybe_round(gy, B, ctx.lp)
        gx = torch.where(pos, g, ops(B).mul(g, s_b))
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None


def leaky_relu(x: torch.Tensor, negative_slope: float = 0.01, policy: PolicyLike = None, *,
               stats: LayerStats | None = None) -> torch.Tensor:
    """x for x > 0, else slope * x rounded in F (the slope itself rounded to F); the
    backward multiplies the error by the slope rounded to B."""
    return _LeakyReLU.apply(x, float(negative_slope), resolve(policy), stats)


class _Smooth(torch.autograd.Function):
    """sigmoid and tanh: y = f(x) faithfully rounded in F; dL/dx = gy * f'(x) in B, with
    f' from y by one fused multiply-add (y - y*y, 1 - y*y)."""

    @staticmethod
    def forward(ctx, x, kind: str, lp: LayerPolicy, stats):
        F = lp.forward
        y = getattr(ops(F), kind)(maybe_round(x, F, lp))
        _record(stats, "forward", y, F)
        ctx.save_for_backward(y)
        ctx.kind, ctx.lp, ctx.stats = kind, lp, stats
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        B = ctx.lp.backward
        Bo = ops(B)
        y_b = maybe_round(y, B, ctx.lp)
        deriv = Bo.fma(-y_b, y_b, y_b if ctx.kind == "sigmoid" else 1.0)
        gx = Bo.mul(maybe_round(gy, B, ctx.lp), deriv)
        _record(ctx.stats, "backward", gx, B)
        return gx, None, None, None


def sigmoid(x: torch.Tensor, policy: PolicyLike = None, *, stats: LayerStats | None = None) -> torch.Tensor:
    """Logistic sigmoid in F (Posit.sigmoid: evaluated in float64, rounded once);
    backward gy * (y - y*y) in B, the bracket as one fma."""
    return _Smooth.apply(x, "sigmoid", resolve(policy), stats)


def tanh(x: torch.Tensor, policy: PolicyLike = None, *, stats: LayerStats | None = None) -> torch.Tensor:
    """tanh in F (evaluated in float64, rounded once); backward gy * (1 - y*y) in B, the
    bracket as one fma."""
    return _Smooth.apply(x, "tanh", resolve(policy), stats)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, lp: LayerPolicy, generator):
        F = lp.forward
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
        scale = 1.0 / (1.0 - p)
        s_f = round_scalar(scale, F)
        x_f = maybe_round(x, F, lp)
        y = ops(F).mul(x_f, keep.to(x_f.dtype) * s_f)
        ctx.save_for_backward(keep)
        ctx.scale, ctx.lp = scale, lp
        return y

    @staticmethod
    def backward(ctx, gy):
        (keep,) = ctx.saved_tensors
        B = ctx.lp.backward
        s_b = round_scalar(ctx.scale, B)
        g = maybe_round(gy, B, ctx.lp)
        return ops(B).mul(g, keep.to(g.dtype) * s_b), None, None, None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, policy: PolicyLike = None, *,
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
    if lp.forward is None and lp.backward is None and generator is None:
        return TF.dropout(x, p, True)  # float stages: torch's own dropout, same random stream
    return _Dropout.apply(x, float(p), lp, generator)


def flatten(x: torch.Tensor, start_dim: int = 1, end_dim: int = -1) -> torch.Tensor:
    """Reshape only: no arithmetic, so no format is involved."""
    return torch.flatten(x, start_dim, end_dim)


# --------------------------------------------------------------------------- batch norm
def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (C, M) with M = N * prod(*)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _from_channels_first(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n, c = shape[0], shape[1]
    return t.reshape(c, n, *shape[2:]).transpose(0, 1).contiguous()


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, w_f, w_b, b_f, running_mean, running_var, training, momentum, eps, lp: LayerPolicy, stats):
        F, R = lp.forward, lp.optimizer
        Fo = ops(F)
        x_f = _channels_first(maybe_round(x, F, lp))
        m = x_f.shape[1]
        if training:
            mean = Fo.div(_sum(x_f, 1, F, lp), float(m))
            d = Fo.sub(x_f, mean[:, None])
            sq = _rowdot(d, d, F, lp)
            var = Fo.div(sq, float(m))
            if running_mean is not None:
                with torch.no_grad():  # running statistics: state, kept in O like the weights
                    Ro = ops(R)
                    unbiased = ops(R).div(sq, float(max(m - 1, 1)))
                    running_mean.copy_(Ro.fma(momentum, Ro.sub(mean, running_mean), running_mean))
                    running_var.copy_(Ro.fma(momentum, Ro.sub(unbiased, running_var), running_var))
        else:
            mean, var = maybe_round(running_mean, F, lp), maybe_round(running_var, F, lp)
            d = Fo.sub(x_f, mean[:, None])
        inv_std = Fo.div(1.0, Fo.sqrt(Fo.add(var, eps)))
        xhat = Fo.mul(d, inv_std[:, None])
        y = xhat if w_f is None else Fo.fma(w_f[:, None], xhat, b_f[:, None])
        _record(stats, "forward", y, F)
        ctx.save_for_backward(xhat, inv_std, w_b)
        ctx.lp, ctx.stats, ctx.weight, ctx.bias, ctx.training, ctx.shape = lp, stats, weight, bias, training, x.shape
        return _from_channels_first(y, x.shape)

    @staticmethod
    def backward(ctx, gy):
        xhat, inv_std, w_b = ctx.saved_tensors
        lp, stats = ctx.lp, ctx.stats
        B, G = lp.backward, lp.gradient
        Bo = ops(B)
        g = _channels_first(gy)
        gx = gw = gb = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_g, xhat_g = maybe_round(g, G, lp), maybe_round(xhat, G, lp)
            div = reduction.divisor()
            gw, gb = _param_grads([(_rowdot(g_g, xhat_g, G, lp), ctx.weight if ctx.needs_input_grad[1] else None),
                                   (_sum(g_g, 1, G, lp), ctx.bias if ctx.needs_input_grad[2] else None)], div, lp, stats)
        if ctx.needs_input_grad[0]:
            g_b, xhat_b, inv_b = maybe_round(g, B, lp), maybe_round(xhat, B, lp), maybe_round(inv_std, B, lp)
            dxhat = g_b if w_b is None else Bo.mul(g_b, w_b[:, None])
            if ctx.training:
                m = float(g.shape[1])
                a = Bo.div(_sum(dxhat, 1, B, lp), m)
                b = Bo.div(_rowdot(dxhat, xhat_b, B, lp), m)
                dxhat = Bo.fma(-xhat_b, b[:, None], Bo.sub(dxhat, a[:, None]))
            gx = _from_channels_first(Bo.mul(dxhat, inv_b[:, None]), ctx.shape)
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
    policy: PolicyLike = None,
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
    w_f = None if weight is None else (maybe_round(weight.detach(), lp.forward, lp) if weight_f is None else weight_f)
    w_b = None if weight is None else (maybe_round(weight.detach(), lp.backward, lp) if weight_b is None else weight_b)
    b_f = None if bias is None else (maybe_round(bias.detach(), lp.forward, lp) if bias_f is None else bias_f)
    if w_f is not None and b_f is None:
        b_f = torch.zeros_like(w_f)
    return _BatchNorm.apply(x, weight, bias, w_f, w_b, b_f, running_mean, running_var, training, momentum, eps, lp, stats)


# --------------------------------------------------------------------------- loss stage
def _softmax_parts(x: torch.Tensor, dim: int, lp: LayerPolicy):
    """z = x - max, e = exp(z), s = L-quire sum of e (keepdim), all in L."""
    L = lp.loss
    Lo = ops(L)
    x_l = maybe_round(x, L, lp)
    z = Lo.sub(x_l, x_l.amax(dim, keepdim=True))
    e = Lo.exp(z)
    return z, e, _sum(e, dim, L, lp, keepdim=True)


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, lp: LayerPolicy):
        Lo = ops(lp.loss)
        z, _, s = _softmax_parts(x, dim, lp)
        y = Lo.sub(z, Lo.log(s))
        ctx.save_for_backward(y)
        ctx.dim, ctx.lp = dim, lp
        return y

    @staticmethod
    def backward(ctx, gy):
        (y,) = ctx.saved_tensors
        lp, L = ctx.lp, ctx.lp.loss
        Lo = ops(L)
        g = maybe_round(gy, L, lp)
        return Lo.fma(-Lo.exp(y), _sum(g, ctx.dim, L, lp, keepdim=True), g), None, None


def log_softmax(x: torch.Tensor, dim: int = -1, policy: PolicyLike = None) -> torch.Tensor:
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


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, lp: LayerPolicy):
        L = lp.loss
        Lo = ops(L)
        z, e, s = _softmax_parts(x, 1, lp)
        z_t = z.gather(1, target.unsqueeze(1))
        per_sample = Lo.sub(Lo.log(s), z_t).reshape(-1)
        n = per_sample.shape[0]
        loss = Lo.div(_sum(per_sample, 0, L, lp), float(n))
        ctx.save_for_backward(e, s, target)
        ctx.lp = lp
        return loss

    @staticmethod
    def backward(ctx, gy):
        e, s, target = ctx.saved_tensors
        lp, L = ctx.lp, ctx.lp.loss
        Lo = ops(L)
        softmax = Lo.div(e, s)
        idx = target.unsqueeze(1)
        g = softmax.scatter(1, idx, Lo.sub(softmax.gather(1, idx), 1.0))  # softmax - onehot
        factor = _loss_grad_factor(lp, gy, g.shape[0], g.shape[0])
        if factor != 1.0:
            g = Lo.mul(g, factor)
        return g, None, None


def cross_entropy(x: torch.Tensor, target: torch.Tensor, policy: PolicyLike = None) -> torch.Tensor:
    """Mean cross entropy of logits (N, C) and class indices (N,), in L.

    Softmax as exp(x - max) with the sum in an L quire; the loss value (mean of
    log(sum) - z_target, the sum in a quire) is for reporting. The gradient is softmax -
    onehot in L, unscaled under the "positnn" reduction (the layers divide by N), divided
    by N under "mean", times the upstream gradient and the static loss scale.
    """
    if x.dim() != 2 or target.dim() != 1 or target.dtype.is_floating_point:
        raise ValueError(f"cross_entropy expects logits (N, C) and int class indices (N,), got {tuple(x.shape)} "
                         f"and {tuple(target.shape)} {target.dtype}")
    return _CrossEntropy.apply(x, target, resolve(policy))


class _MSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, lp: LayerPolicy):
        L = lp.loss
        Lo = ops(L)
        d = Lo.sub(maybe_round(x, L, lp), maybe_round(target, L, lp))
        flat = d.reshape(1, -1)
        loss = Lo.div(_mm(flat, flat.transpose(0, 1), L, lp).reshape(()), float(d.numel()))
        ctx.save_for_backward(d)
        ctx.lp = lp
        return loss

    @staticmethod
    def backward(ctx, gy):
        (d,) = ctx.saved_tensors
        lp = ctx.lp
        # torch's mean gradient is 2 d / numel; "positnn" multiplies it by N (2 d / D).
        factor = 2.0 * _loss_grad_factor(lp, gy, d.numel(), _batch(d))
        g = d if factor == 1.0 else ops(lp.loss).mul(d, factor)
        return g, None, None


def mse_loss(x: torch.Tensor, target: torch.Tensor, policy: PolicyLike = None) -> torch.Tensor:
    """Mean squared error in L: the sum of squares in one L quire, divided by the element
    count. The gradient is 2 (x - target) / numel ("mean") or times N ("positnn")."""
    if x.shape != target.shape:
        raise ValueError(f"mse_loss needs equal shapes, got {tuple(x.shape)} and {tuple(target.shape)}")
    return _MSE.apply(x, target, resolve(policy))


__all__ = [
    "linear", "conv2d", "max_pool2d", "avg_pool2d", "relu", "leaky_relu", "sigmoid", "tanh",
    "dropout", "flatten", "batch_norm", "log_softmax", "cross_entropy", "mse_loss", "ops", "resolve",
]
