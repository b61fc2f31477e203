"""What each aten op means in a stage: the table the engine's dispatch mode reads.

- Data movement and comparisons (views, cat, index, gather, embedding lookup, where,
  max, relu, masks ...) are exact and run as torch runs them.
- Element-wise +, -, *, / and sqrt are correctly rounded; ``alpha`` multiples are fused
  (one rounding).
- Dot products and reductions (mm, bmm, addmm, baddbmm, convolution and its gradients,
  sum, mean, var, softmax and layer-norm statistics) accumulate in one quire and round once.
- Functions without an exact posit algorithm (exp, log, tanh, sigmoid, erf, GELU, SiLU,
  rsqrt, pow, and the derivative formulas of such functions) are evaluated in float64 on
  the stage's operands and rounded once.
- Composite ops without an entry (native_batch_norm, group_norm, nll_loss ...) run through
  torch's own decompositions, so each of their parts has these semantics.

Additive masks of -inf (causal attention) are masks, not values: they pass through
``add`` and ``masked_fill`` and give exact zeros in softmax.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch._decomp import decomposition_table

from ..stage import Stage

aten = torch.ops.aten
Handler = Callable[[Stage, Any, tuple, dict], Any]
TABLE: dict[Any, Handler] = {}

EXACT = {
    aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand, aten.clone,
    aten.contiguous, aten.slice, aten.select, aten.squeeze, aten.unsqueeze, aten.cat, aten.stack, aten.split,
    aten.split_with_sizes, aten.unbind, aten.index, aten.index_select, aten.gather, aten.embedding, aten.where,
    aten.max, aten.amax, aten.argmax, aten.min, aten.amin, aten.argmin, aten.relu, aten.threshold_backward,
    aten.detach, aten.alias, aten._to_copy, aten.to, aten.copy_, aten.zeros, aten.ones, aten.full, aten.empty, aten.empty_like,
    aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
    aten.arange, aten.scalar_tensor, aten.lift_fresh, aten.lift_fresh_copy, aten.fill_, aten.zero_, aten.le, aten.lt,
    aten.gt, aten.ge, aten.eq, aten.ne, aten.logical_not, aten.logical_and, aten.logical_or, aten.bitwise_not,
    aten.bitwise_and, aten.bitwise_or, aten.tril, aten.triu, aten.bernoulli_, aten.bernoulli, aten.rand, aten.rand_like,
    aten.randn, aten.neg, aten.abs, aten.sign, aten.sort, aten.topk, aten.nonzero, aten.repeat, aten.flip, aten.roll,
    aten.constant_pad_nd, aten.max_pool2d_with_indices, aten.isnan, aten.isinf, aten.isfinite, aten.any, aten.all,
    aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.as_strided, aten.unfold,
    aten.diagonal, aten.narrow, aten.movedim, aten.squeeze_, aten.unsqueeze_, aten.t_, aten.transpose_,
    aten.masked_select, aten.index_put, aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter,
    aten.resize_, aten.set_, aten.view_as_real, aten.item, aten._local_scalar_dense, aten.is_same_size,
    aten.equal, aten.one_hot, aten.exponential_,
    aten.uniform_, aten.normal_, aten.detach_, aten.expand_copy, aten.permute_copy, aten.view_copy,
    aten.squeeze_copy, aten.unsqueeze_copy, aten.transpose_copy, aten.t_copy, aten.alias_copy,
}


def op(*packets: Any) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for p in packets:
            TABLE[p] = fn
        return fn
    return register


def _bind(func, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in (overloads differ in which
    arguments are positional)."""
    bound = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        else:
            bound[a.name] = a.default_value if a.has_default_value() else None
    return bound


def _inplace(func, args, result):
    """An in-place overload writes its result into its first argument and returns it."""
    if func._schema.name.endswith("_") or func._schema.name.startswith("aten::__i"):
        return args[0].copy_(result)
    return result


def _masked(x: torch.Tensor) -> torch.Tensor | None:
    """The -inf entries of an additive mask, or None when there are none."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        return None
    neg = x == -math.inf
    return neg if bool(neg.any()) else None


def _scalar(st: Stage, v):
    return float(st.round(torch.tensor(float(v), dtype=torch.float64))) if isinstance(v, (int, float)) else v


@op(aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub)
def _add(st, func, args, kwargs):
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    name = func._schema.name
    if name == "aten::rsub":
        a, b = b, a
    sign = -1 if name.startswith("aten::sub") or name == "aten::rsub" else 1
    masks = [m for m in (_masked(a), _masked(b)) if m is not None]
    mask = masks[0] if len(masks) == 1 else (torch.logical_or(*masks) if masks else None)
    if mask is not None:  # -inf + anything is the mask
        a = torch.where(a == -math.inf, 0.0, a) if isinstance(a, torch.Tensor) else a
        b = torch.where(b == -math.inf, 0.0, b) if isinstance(b, torch.Tensor) else b
    if alpha * sign == 1:
        y = st.add(a, b)
    elif alpha * sign == -1:
        y = st.sub(a, b)
    else:  # a + alpha * b, one rounding
        b_t = b if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=torch.float64)
        y = st.fma(_scalar(st, alpha * sign), b_t, a)
    if mask is not None:
        y = y.masked_fill(torch.broadcast_to(mask, y.shape), -math.inf)
    return _inplace(func, args, y.to(_result_dtype(args)))


def _result_dtype(args) -> torch.dtype:
    return next(t.dtype for t in args if isinstance(t, torch.Tensor))


@op(aten.mul, aten.mul_)
def _mul(st, func, args, kwargs):
    return _inplace(func, args, st.mul(args[0], _scalar(st, args[1])).to(_result_dtype(args)))


@op(aten.div, aten.div_)
def _div(st, func, args, kwargs):
    if kwargs.get("rounding_mode") is not None:  # floor / trunc division: an integer result
        return _inplace(func, args, st.pointwise(lambda a, b: torch.div(a, b, rounding_mode=kwargs["rounding_mode"]),
                                                 *args[:2]).to(_result_dtype(args)))
    return _inplace(func, args, st.div(args[0], _scalar(st, args[1])).to(_result_dtype(args)))


@op(aten.reciprocal)
def _reciprocal(st, func, args, kwargs):
    return st.div(1.0, args[0]).to(args[0].dtype)


@op(aten.sqrt)
def _sqrt(st, func, args, kwargs):
    return st.sqrt(args[0]).to(args[0].dtype)


@op(aten.pow)
def _pow(st, func, args, kwargs):
    x, e = args[0], args[1]
    if isinstance(x, torch.Tensor) and e == 2:
        return st.mul(x, x).to(x.dtype)
    if isinstance(x, torch.Tensor) and e == 0.5:
        return st.sqrt(x).to(x.dtype)
    return _pointwise(st, func, args, kwargs)


POINTWISE_FLOAT64 = {
    aten.exp, aten.log, aten.tanh, aten.sigmoid, aten.erf, aten.gelu, aten.silu, aten.rsqrt, aten.log1p, aten.expm1,
    aten.sin, aten.cos, aten.softplus, aten.elu, aten.leaky_relu, aten.tanh_backward, aten.sigmoid_backward,
    aten.gelu_backward, aten.silu_backward, aten.softplus_backward, aten.elu_backward, aten.leaky_relu_backward,
    aten.erfinv, aten.log2, aten.exp2, aten.atan, aten.hardswish, aten.hardsigmoid, aten.mish, aten.lerp,
    aten.addcmul, aten.addcdiv,
}


@op(aten.clamp, aten.clamp_min, aten.clamp_max, aten.hardtanh, aten.clamp_, aten.hardtanh_)
def _clamp(st, func, args, kwargs):
    """Each output is its input or a bound: exact, once the bounds are stage values."""
    return _inplace(func, args, st.round(func(args[0].clone() if func._schema.name.endswith("_") else args[0],
                                              *args[1:], **kwargs)).to(args[0].dtype))


def _pointwise(st, func, args, kwargs):
    out_dtype = _result_dtype(args)
    return st.pointwise(lambda *xs: func(*xs, **kwargs), *args).to(out_dtype)


for _p in POINTWISE_FLOAT64:
    TABLE[_p] = _pointwise


@op(aten.mm, aten.bmm)
def _mm(st, func, args, kwargs):
    return st.matmul(args[0], args[1]).to(args[0].dtype)


@op(aten.addmm, aten.baddbmm)
def _addmm(st, func, args, kwargs):
    bias, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if beta == 1 and alpha == 1 and bias.dim() <= 1:  # the bias inside the quire: one rounding
        n = b.shape[-1]
        return st.matmul(a, b, bias.expand(n)).to(a.dtype)
    prod = st.matmul(a, b)
    if alpha != 1:
        prod = st.mul(prod, _scalar(st, alpha))
    if beta != 1:
        bias = st.mul(bias, _scalar(st, beta))
    return st.add(prod, bias).to(a.dtype)


@op(aten.dot, aten.mv)
def _dot(st, func, args, kwargs):
    return st.matmul(args[0], args[1]).to(args[0].dtype)


@op(aten.sum)
def _sum(st, func, args, kwargs):
    b = _bind(func, args, kwargs)
    x = b["self"]
    if not x.dtype.is_floating_point:
        return func(*args, **kwargs)
    return st.sum(x, b.get("dim"), bool(b.get("keepdim"))).to(b.get("dtype") or x.dtype)


@op(aten.mean)
def _mean(st, func, args, kwargs):
    b = _bind(func, args, kwargs)
    x, dim = b["self"], b.get("dim")
    count = math.prod(x.shape[d] for d in _dimlist(x, dim))
    return st.div(st.sum(x, dim, bool(b.get("keepdim"))), float(count)).to(b.get("dtype") or x.dtype)


def _dimlist(x, dim) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    return [d % max(x.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)]


@op(aten.var, aten.var_mean)
def _var(st, func, args, kwargs):
    b = _bind(func, args, kwargs)
    x, dim, keepdim = b["self"], b.get("dim"), bool(b.get("keepdim"))
    if "unbiased" in b:
        correction = 1 if b["unbiased"] is None or b["unbiased"] else 0
    else:
        correction = 1 if b.get("correction") is None else b["correction"]
    count = math.prod(x.shape[d] for d in _dimlist(x, dim))
    mean = st.div(st.sum(x, dim, True), float(count))
    d = st.sub(x, mean)
    var = st.div(st.sum(st.mul(d, d), dim, keepdim), float(max(count - correction, 0)))
    if func.overloadpacket is aten.var_mean:
        return var.to(x.dtype), (mean if keepdim else mean.squeeze(_dimlist(x, dim))).to(x.dtype)
    return var.to(x.dtype)


def _softmax_rows(st: Stage, x: torch.Tensor, dim: int):
    """exp(x - max) and its quire sum along ``dim``; -inf entries give exact zeros."""
    mask = x == -math.inf
    m = x.amax(dim, keepdim=True).nan_to_num(neginf=0.0)
    z = st.sub(torch.where(mask, m, x), m)
    e = st.pointwise(torch.exp, z).masked_fill(mask, 0.0)
    return e, st.sum(e, dim, keepdim=True)


@op(aten._softmax, aten._safe_softmax)
def _softmax(st, func, args, kwargs):
    x, dim = args[0], args[1]
    e, s = _softmax_rows(st, x, dim)
    y = st.div(e, torch.where(s == 0, 1.0, s))  # a fully masked row is 0, as _safe_softmax
    return y.to(x.dtype)


@op(aten._log_softmax)
def _log_softmax(st, func, args, kwargs):
    x, dim = args[0], args[1]
    mask = x == -math.inf
    m = x.amax(dim, keepdim=True).nan_to_num(neginf=0.0)
    z = st.sub(torch.where(mask, m, x), m)
    _, s = _softmax_rows(st, x, dim)
    return st.sub(z, st.pointwise(torch.log, s)).masked_fill(mask, -math.inf).to(x.dtype)


@op(aten._softmax_backward_data)
def _softmax_backward(st, func, args, kwargs):
    g, y, dim = args[0], args[1], args[2]
    # sum(g * y) along dim: each product exact inside one quire, rounded once
    dot = st.matmul(g.movedim(dim, -1).unsqueeze(-2), y.movedim(dim, -1).unsqueeze(-1)).squeeze(-1).movedim(-1, dim)
    return st.mul(y, st.sub(g, dot)).to(g.dtype)


@op(aten._log_softmax_backward_data)
def _log_softmax_backward(st, func, args, kwargs):
    g, y, dim = args[0], args[1], args[2]
    p = st.pointwise(torch.exp, y)
    return st.sub(g, st.mul(p, st.sum(g, dim, keepdim=True))).to(g.dtype)


def _row_stats(st: Stage, x2: torch.Tensor):
    """Mean and biased variance of each row of (R, M), each sum in one quire."""
    m = x2.shape[1]
    mean = st.div(st.sum(x2, 1, keepdim=True), float(m))
    d = st.sub(x2, mean)
    var = st.div(st.matmul(d.unsqueeze(1), d.unsqueeze(2)).reshape(-1, 1), float(m))
    return mean, d, var


@op(aten.native_layer_norm)
def _layer_norm(st, func, args, kwargs):
    """y = (x - mean) * rstd * w + b per row, statistics in quires, the affine step one fma."""
    x, shape, w, b, eps = args
    m = math.prod(shape)
    x2 = st.round(x).reshape(-1, m)
    mean, d, var = _row_stats(st, x2)
    rstd = st.pointwise(torch.rsqrt, st.add(var, _scalar(st, eps)))
    xhat = st.mul(d, rstd)
    if w is not None:
        y = st.fma(w.reshape(1, m), xhat, (b if b is not None else torch.zeros_like(w)).reshape(1, m))
    else:
        y = xhat if b is None else st.add(xhat, b.reshape(1, m))
    lead = x.shape[:x.dim() - len(shape)]
    stat_shape = (*lead, *([1] * len(shape)))
    return y.reshape(x.shape).to(x.dtype), mean.reshape(stat_shape).to(x.dtype), rstd.reshape(stat_shape).to(x.dtype)


@op(aten.native_layer_norm_backward)
def _layer_norm_backward(st, func, args, kwargs):
    """Input error in quires per row; weight and bias gradients as quire sums over rows of
    g * xhat and g (the engine asks for them in G, the input error in B)."""
    g, x, shape, mean, rstd, w, b, mask = args
    m = math.prod(shape)
    g2, x2 = st.round(g).reshape(-1, m), st.round(x).reshape(-1, m)
    mean2, rstd2 = mean.reshape(-1, 1), rstd.reshape(-1, 1)
    xhat = st.mul(st.sub(x2, mean2), rstd2)
    gx = gw = gb = None
    if mask[0]:
        gxh = g2 if w is None else st.mul(g2, w.reshape(1, m))
        a = st.div(st.sum(gxh, 1, keepdim=True), float(m))
        c = st.div(st.matmul(gxh.unsqueeze(1), xhat.unsqueeze(2)).reshape(-1, 1), float(m))
        gx = st.mul(st.fma(-xhat, c, st.sub(gxh, a)), rstd2).reshape(x.shape).to(x.dtype)
    if mask[1] and w is not None:
        gw = st.matmul(g2.t().unsqueeze(1), xhat.t().unsqueeze(2)).reshape(w.shape).to(w.dtype)
    if mask[2] and b is not None:
        gb = st.sum(g2, 0).reshape(b.shape).to(b.dtype)
    return gx, gw, gb


@op(aten.embedding_dense_backward)
def _embedding_backward(st, func, args, kwargs):
    """The table's gradient: for each row, the quire sum of the errors of its lookups
    (a one-hot matmul, so every sum is exact and rounded once)."""
    g, idx, num, padding_idx, _ = args
    flat = idx.reshape(-1)
    onehot = torch.zeros(num, flat.numel(), dtype=g.dtype, device=g.device)
    onehot[flat, torch.arange(flat.numel(), device=g.device)] = 1
    if padding_idx >= 0:
        onehot[padding_idx] = 0
    return st.matmul(onehot, g.reshape(flat.numel(), -1)).to(g.dtype)


@op(aten.masked_fill, aten.masked_fill_)
def _masked_fill(st, func, args, kwargs):
    x, mask, value = args
    if isinstance(value, torch.Tensor):
        value = value.item()
    if math.isfinite(value):
        value = _scalar(st, value)
    return func(x, mask, value)


@op(aten.native_dropout)
def _dropout(st, func, args, kwargs):
    x, p, train = args
    if not train or p == 0:
        return x.clone(), torch.ones_like(x, dtype=torch.bool)
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    scale = _scalar(st, 1.0 / (1.0 - p))
    return st.mul(x, scale).masked_fill(~keep, 0.0).to(x.dtype), keep


@op(aten.native_dropout_backward)
def _dropout_backward(st, func, args, kwargs):
    g, keep, scale = args
    return st.mul(g, _scalar(st, scale)).masked_fill(~keep, 0.0).to(g.dtype)


def _pair2(v, fill):
    v = list(v)
    return tuple(v) if len(v) == 2 else (v[0], fill)


@op(aten.convolution)
def _convolution(st, func, args, kwargs):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
    if transposed:
        raise NotImplementedError("transposed convolution has no posit semantics in positnn yet")
    if x.dim() == 3:  # conv1d as a conv2d of height 1
        y = st.conv2d(x.unsqueeze(2), w.unsqueeze(2), b, (1, stride[0]), (0, padding[0]), (1, dilation[0]), groups)
        return y.squeeze(2).to(x.dtype)
    if x.dim() != 4:
        raise NotImplementedError(f"convolution of {x.dim() - 2}-d inputs has no posit semantics in positnn yet")
    return st.conv2d(x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups).to(x.dtype)


@op(aten.convolution_backward)
def _convolution_backward(st, func, args, kwargs):
    g, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = args
    if transposed:
        raise NotImplementedError("transposed convolution has no posit semantics in positnn yet")
    one_d = x.dim() == 3
    if one_d:
        g, x, w = g.unsqueeze(2), x.unsqueeze(2), w.unsqueeze(2)
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    geo = (tuple(stride), tuple(padding), tuple(dilation), groups)
    gx = st.conv2d_input_grad(g, w, x.shape, *geo).to(x.dtype) if mask[0] else None
    gw = st.conv2d_weight_grad(x, g, w.shape, *geo).to(w.dtype) if mask[1] else None
    gb = st.sum(g, (0, 2, 3)).to(g.dtype) if mask[2] else None
    if one_d:
        gx = None if gx is None else gx.squeeze(2)
        gw = None if gw is None else gw.squeeze(2)
    return gx, gw, gb


@op(aten.avg_pool2d)
def _avg_pool2d(st, func, args, kwargs):
    x, kernel = args[0], args[1]
    stride = args[2] if len(args) > 2 and args[2] else kernel
    padding = args[3] if len(args) > 3 else (0, 0)
    c = x.shape[1]
    kh, kw = _pair2(kernel, kernel[0])
    w = torch.ones(c, 1, kh, kw, dtype=x.dtype, device=x.device)
    s = st.conv2d(x, w, None, _pair2(stride, stride[0]), _pair2(padding, padding[0] if padding else 0), (1, 1), c)
    return st.div(s, float(kh * kw)).to(x.dtype)


@op(aten._adaptive_avg_pool2d, aten.adaptive_avg_pool2d)
def _adaptive_avg_pool2d(st, func, args, kwargs):
    x, size = args[0], tuple(args[1])
    h, w = x.shape[-2:]
    if size == (1, 1):
        return st.div(st.sum(x, (-2, -1), keepdim=True), float(h * w)).to(x.dtype)
    if h % size[0] or w % size[1]:
        raise NotImplementedError(f"adaptive_avg_pool2d from {(h, w)} to {size} (uneven windows) has no posit semantics yet")
    k = (h // size[0], w // size[1])
    return _avg_pool2d(st, func, (x, k, k, (0, 0)), {})


@op(aten._adaptive_avg_pool2d_backward)
def _adaptive_avg_pool2d_backward(st, func, args, kwargs):
    g, x = args
    h, w = x.shape[-2:]
    if g.shape[-2:] != (1, 1):
        raise NotImplementedError("adaptive_avg_pool2d backward with windows other than the global one")
    return st.div(g, float(h * w)).expand(x.shape).contiguous().to(x.dtype)


@op(aten.max_pool2d_with_indices_backward)
def _max_pool_backward(st, func, args, kwargs):
    """Each input's error is the sum of the errors of the windows it wins: overlapping
    windows add, computed in float64 and rounded once (exact for a few terms)."""
    return st.pointwise(lambda *xs: func(*xs, **kwargs), *args).to(args[0].dtype)


def decomposition(func):
    """torch's decomposition of ``func`` into ops of this table, or None."""
    return decomposition_table.get(func)
