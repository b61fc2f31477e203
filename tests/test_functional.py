"""Functional ops: float stages equal torch (gradcheck in float64); posit stages are
bit-exact against reference compositions of positnn.quire and Posit calls written out
here, with the linear maps taken from torch's float64 Jacobians (exact: every entry is a
single weight, input value or 0/1)."""

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as TF

import positnn.functional as PF
import positnn.nn as pnn
from positnn import Posit, quire, reduction
from posit_reference import fam_universal, round_exact
from positnn.policy import LayerPolicy
from positnn.stats import LayerStats

P8, P10, P12, P16 = Posit(8, 2), Posit(10, 1), Posit(12, 2), Posit(16, 2)
# Four different formats, so a stage mix-up cannot go unnoticed.
MIXED = LayerPolicy(forward=P8, backward=P10, gradient=P12, optimizer=P16, loss=P16, grad_reduction="positnn")
F64 = torch.float64


def jacobian(f, x):
    """J with f(x).flatten() == J @ x.flatten() for a linear f."""
    return torch.autograd.functional.jacobian(lambda t: f(t).reshape(-1), x.double()).reshape(-1, x.numel())


def posit_randn(fmt, *shape, scale=1.0):
    return fmt.round(torch.randn(*shape, dtype=F64) * scale)


class _FromPositnnLoss(torch.autograd.Function):
    """Identity whose backward announces what a positnn loss would: that the incoming
    gradient is ``factor`` times the true one (so the layers divide by it in G)."""

    @staticmethod
    def forward(ctx, y, factor):
        ctx.factor = factor
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        reduction.announce(ctx.factor)
        return gy, None


def from_positnn_loss(y, factor):
    return _FromPositnnLoss.apply(y, float(factor))


def as_param(fmt, t):
    return torch.nn.Parameter(fmt.round(t))


# --------------------------------------------------------------------------- float == torch
def _gradcheck(f, *inputs):
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("stride, padding, dilation, groups",
                         [(1, 0, 1, 1), (2, 1, 1, 1), (2, 2, 2, 2), ((1, 2), (0, 1), 1, 1), (3, 0, 1, 1)])
def test_conv2d_float_matches_torch(stride, padding, dilation, groups):
    x = torch.randn(2, 4, 9, 8, dtype=F64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=F64, requires_grad=True)
    b = torch.randn(6, dtype=F64, requires_grad=True)
    _gradcheck(lambda x, w, b: PF.conv2d(x, w, b, stride, padding, dilation, groups), x, w, b)
    y = PF.conv2d(x, w, b, stride, padding, dilation, groups)
    assert torch.allclose(y, TF.conv2d(x, w, b, stride, padding, dilation, groups))


def test_float_ops_gradcheck():
    x = torch.randn(2, 3, 8, 8, dtype=F64, requires_grad=True)
    _gradcheck(lambda x, w, b: PF.linear(x, w, b), torch.randn(5, 7, dtype=F64, requires_grad=True),
               torch.randn(3, 7, dtype=F64, requires_grad=True), torch.randn(3, dtype=F64, requires_grad=True))
    for f in (lambda x: PF.max_pool2d(x, 2), lambda x: PF.max_pool2d(x, 3, 1, 1), lambda x: PF.avg_pool2d(x, 2),
              lambda x: PF.avg_pool2d(x, 3, 2, 1), PF.relu, lambda x: PF.leaky_relu(x, 0.1), PF.sigmoid, PF.tanh,
              lambda x: PF.log_softmax(x, 1)):
        _gradcheck(f, x)
    t = torch.randint(0, 4, (5,))
    z = torch.randn(5, 4, dtype=F64, requires_grad=True)
    _gradcheck(lambda z: PF.cross_entropy(z, t), z)
    _gradcheck(lambda z: PF.mse_loss(z, torch.ones_like(z)), z)
    assert torch.allclose(PF.cross_entropy(z, t), TF.cross_entropy(z, t))
    assert torch.allclose(PF.mse_loss(z, z.detach() * 0.5), TF.mse_loss(z, z.detach() * 0.5))


@pytest.mark.parametrize("shape", [(6, 4), (4, 3, 5), (3, 4, 5, 5)])
def test_batch_norm_float_matches_torch(shape):
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    g = torch.randn(shape[1], dtype=F64, requires_grad=True)
    b = torch.randn(shape[1], dtype=F64, requires_grad=True)
    _gradcheck(lambda x, g, b: PF.batch_norm(x, None, None, g, b, True), x, g, b)
    rm, rv = torch.randn(shape[1], dtype=F64), torch.rand(shape[1], dtype=F64) + 0.5
    _gradcheck(lambda x, g, b: PF.batch_norm(x, rm, rv, g, b, False), x, g, b)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y1 = PF.batch_norm(x, rm1, rv1, g, b, True, 0.1)
    y2 = TF.batch_norm(x, rm2, rv2, g, b, True, 0.1)
    assert torch.allclose(y1, y2) and torch.allclose(rm1, rm2) and torch.allclose(rv1, rv2)


# --------------------------------------------------------------------------- posit, bit-exact
def _reference_param_grad(g_quire, n, lp):
    """G result / N in G, then into an empty O gradient."""
    return lp.optimizer.round(lp.gradient.div(g_quire, float(n)))


@pytest.mark.parametrize("quire_mode", ["exact", "none"])
def test_linear_bit_exact(quire_mode):
    lp = LayerPolicy(**{**MIXED.__dict__, "quire": quire_mode})
    F, B, G = lp.forward, lp.backward, lp.gradient
    x = torch.randn(6, 9, dtype=F64, requires_grad=True)
    w, b = as_param(P16, torch.randn(4, 9) * 0.3), as_param(P16, torch.randn(4) * 0.1)
    gy = posit_randn(P16, 6, 4)
    y = PF.linear(x, w, b, lp)
    from_positnn_loss(y, 6).backward(gy)
    x_f = F.round(x.detach())
    assert torch.equal(y, quire.linear(x_f, F.round(w.detach()), F.round(b.detach()), F, mode=quire_mode))
    assert torch.equal(x.grad.to(B.dtype), quire.matmul(B.round(gy), B.round(w.detach()), B, mode=quire_mode))
    assert torch.equal(w.grad, _reference_param_grad(quire.matmul(G.round(gy).T, G.round(x_f), G, mode=quire_mode), 6, lp))
    assert torch.equal(b.grad, _reference_param_grad(quire.sum(G.round(gy), 0, G, mode=quire_mode), 6, lp))


@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 2, 1, 1), (2, 1, 1, 1), (1, 0, 2, 2), ((2, 1), (1, 0), 1, 1)])
def test_conv2d_bit_exact(stride, padding, dilation, groups):
    lp = MIXED
    F, B, G = lp.forward, lp.backward, lp.gradient
    x = torch.randn(2, 4, 7, 6, dtype=F64, requires_grad=True)
    w, b = as_param(P16, torch.randn(6, 4 // groups, 3, 3) * 0.3), as_param(P16, torch.randn(6) * 0.1)
    y = PF.conv2d(x, w, b, stride, padding, dilation, groups, lp)
    gy = posit_randn(P16, *y.shape, scale=0.5)
    from_positnn_loss(y, 2).backward(gy)
    x_f, w_b = F.round(x.detach()), B.round(w.detach())
    geo = (stride, padding, dilation, groups)
    assert torch.equal(y, quire.conv2d(x_f, F.round(w.detach()), F.round(b.detach()), F, *geo))
    # Input error: gy @ J_x (J_x's entries are single B weights), one B quire per input.
    j_x = jacobian(lambda t: TF.conv2d(t, w_b.double(), None, *geo), x_f)
    gx = quire.matmul(B.round(gy).reshape(1, -1), j_x, B).reshape(x.shape)
    assert torch.equal(x.grad.to(B.dtype), gx)
    # Weight gradient: gy @ J_w (entries are single G inputs), one G quire per weight.
    x_g = G.round(x_f)
    j_w = jacobian(lambda t: TF.conv2d(x_g.double(), t, None, *geo), w.detach())
    gw = quire.matmul(G.round(gy).reshape(1, -1), j_w, G).reshape(w.shape)
    assert torch.equal(w.grad, _reference_param_grad(gw, 2, lp))
    # Bias gradient as PositNN's: each sample's positions in a G quire, then the batch.
    per_sample = quire.sum(G.round(gy).reshape(2, 6, -1), 2, G)
    gb = quire.sum(per_sample, 0, G)
    assert torch.equal(b.grad, _reference_param_grad(gb, 2, lp))


def test_conv2d_bias_gradient_rounds_per_sample_then_batch():
    """The bias gradient's two roundings are PositNN's, and they are not one quire's: with
    G = posit(8,2) and 16 samples the two differ (checked against the reference above)."""
    lp = LayerPolicy(forward=P8, backward=P8, gradient=P8, optimizer=P16, loss=P16, grad_reduction="positnn")
    x = torch.randn(16, 3, 6, 6, dtype=F64)
    b = as_param(P16, torch.randn(5) * 0.1)
    w = as_param(P16, torch.randn(5, 3, 3, 3) * 0.3)
    y = PF.conv2d(x, w, b, 1, 0, 1, 1, lp)
    gy = posit_randn(P8, *y.shape)
    from_positnn_loss(y, 16).backward(gy)
    d = P8.round(gy)
    two = P8.div(quire.sum(quire.sum(d.reshape(16, 5, -1), 2, P8), 0, P8), 16.0)
    one = P8.div(quire.sum(d.transpose(0, 1).reshape(5, -1), 1, P8), 16.0)
    assert torch.equal(b.grad, P16.round(two))
    assert not torch.equal(two, one)


def test_gradient_divisor_is_a_G_value():
    """PositNN divides by the batch size as a G posit (StdTensor /= T(n)): in posit(5,2)
    32 is not a value and rounds to 16 (a tie between 16 and 64, to the even pattern)."""
    p5 = Posit(5, 2)
    assert p5.round(torch.tensor([32.0])).item() == 16.0
    lp = LayerPolicy(forward=p5, backward=p5, gradient=p5, optimizer=P16, loss=P16, grad_reduction="positnn")
    x = p5.round(torch.randn(32, 4, dtype=F64))
    w = as_param(P16, torch.randn(3, 4) * 0.5)
    gy = p5.round(torch.randn(32, 3, dtype=F64))
    from_positnn_loss(PF.linear(x, w, None, lp), 32).backward(gy)
    g = quire.matmul(gy.T, x, p5)
    assert torch.equal(w.grad, P16.round(p5.div(g, 16.0)))
    assert not torch.equal(w.grad, P16.round(p5.div(g, 32.0)))


def test_param_grad_accumulates_in_O_with_one_rounding():
    lp = MIXED
    x = posit_randn(P8, 5, 3)
    w = as_param(P16, torch.randn(2, 3))
    gys = [posit_randn(P16, 5, 2), posit_randn(P16, 5, 2)]
    for gy in gys:
        from_positnn_loss(PF.linear(x, w, None, lp), 5).backward(gy)
    G = lp.gradient
    parts = [G.div(quire.matmul(G.round(gy).T, G.round(x), G), 5.0) for gy in gys]
    assert torch.equal(w.grad, P16.add(P16.round(parts[0]), parts[1]))


def test_grad_reduction_mean_and_loss_scale():
    """The loss's reduction and static scale decide what the layers divide by."""
    x = posit_randn(P8, 4, 3)
    w = as_param(P16, torch.randn(2, 3))
    t = torch.tensor([0, 1, 1, 0])
    for grad_reduction, scale, divisor in [("mean", 1.0, None), ("mean", 8.0, 8.0), ("positnn", 4.0, 16.0)]:
        lp = LayerPolicy(forward=P8, backward=P8, gradient=P12, optimizer=P16, loss=P16,
                         grad_reduction=grad_reduction, loss_scale=scale)
        w.grad = None
        y = PF.linear(x, w, None, lp)
        y.retain_grad()
        PF.cross_entropy(y, t, lp).backward()
        g = quire.matmul(P12.round(y.grad).T, x, P12)
        expected = P16.round(g if divisor is None else P12.div(g, divisor))
        assert torch.equal(w.grad, expected)


def test_layers_give_the_true_gradient_without_a_positnn_loss():
    """y.backward(gy) and torch's losses carry the true gradient: no division by N."""
    lp = MIXED
    x = posit_randn(P8, 6, 3)
    w = as_param(P16, torch.randn(2, 3))
    gy = posit_randn(P16, 6, 2)
    PF.linear(x, w, None, lp).backward(gy)
    G = lp.gradient
    assert torch.equal(w.grad, P16.round(quire.matmul(G.round(gy).T, G.round(x), G)))
    # ... and nothing announced in one backward pass carries over to the next.
    w.grad = None
    from_positnn_loss(PF.linear(x, w, None, lp), 6).backward(gy)
    first = w.grad.clone()
    w.grad = None
    PF.linear(x, w, None, lp).backward(gy)
    assert torch.equal(first, P16.round(G.div(quire.matmul(G.round(gy).T, G.round(x), G), 6.0)))
    assert torch.equal(w.grad, P16.round(quire.matmul(G.round(gy).T, G.round(x), G)))


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 1, 1), (3, 2, 0)])
def test_max_pool_routes_exactly(kernel, stride, padding):
    lp = MIXED
    x = posit_randn(P8, 2, 3, 8, 8).requires_grad_()
    y = PF.max_pool2d(x, kernel, stride, padding, policy=lp)
    assert torch.equal(y, TF.max_pool2d(x.detach(), kernel, stride, padding))
    gy = posit_randn(P10, *y.shape)
    y.backward(gy)
    j = torch.autograd.functional.jacobian(  # 0/1: which input each output selected
        lambda t: TF.max_pool2d(t, kernel, stride, padding).reshape(-1), x.detach()).reshape(y.numel(), -1)
    ref = quire.matmul(gy.reshape(1, -1), j.double(), lp.backward).reshape(x.shape)
    assert torch.equal(x.grad.double(), ref.double())


@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (3, 1, 1)])
def test_avg_pool_bit_exact(kernel, stride, padding):
    lp = MIXED
    F, B = lp.forward, lp.backward
    x = torch.randn(2, 3, 6, 6, dtype=F64, requires_grad=True)
    y = PF.avg_pool2d(x, kernel, stride, padding, policy=lp)
    kk = float(kernel * kernel)
    x_f = F.round(x.detach())
    ones = torch.round(jacobian(lambda t: TF.avg_pool2d(t, kernel, stride, padding), x_f) * kk)  # 0/1 windows
    ref = F.div(quire.matmul(ones, x_f.reshape(-1, 1), F).reshape(y.shape), kk)
    assert torch.equal(y, ref)
    gy = posit_randn(P16, *y.shape)
    y.backward(gy)
    gx = quire.matmul(B.div(B.round(gy), kk).reshape(1, -1), ones, B).reshape(x.shape)
    assert torch.equal(x.grad.to(B.dtype), gx)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
def test_smooth_activations_bit_exact(kind):
    lp = MIXED
    F, B = lp.forward, lp.backward
    x = torch.randn(50, dtype=F64, requires_grad=True)
    y = getattr(PF, kind)(x, lp)
    y_ref = getattr(F, kind)(F.round(x.detach()))
    assert torch.equal(y, y_ref)
    gy = posit_randn(P16, 50)
    y.backward(gy)
    y_b = B.round(y_ref)
    deriv = B.fma(-y_b, y_b, y_b) if kind == "sigmoid" else B.fma(-y_b, y_b, 1.0)
    assert torch.equal(x.grad.to(B.dtype), B.mul(B.round(gy), deriv))


def test_relu_leaky_relu_and_dropout():
    lp = MIXED
    F, B = lp.forward, lp.backward
    x = posit_randn(P16, 200).requires_grad_()
    gy = posit_randn(P16, 200)
    PF.relu(x, lp).backward(gy)
    assert torch.equal(x.grad, torch.where(x > 0, gy, 0))
    x.grad = None
    y = PF.leaky_relu(x, 0.1, lp)
    x_f = F.round(x.detach())
    assert torch.equal(y, torch.where(x_f > 0, x_f, F.mul(x_f, float(F.round(torch.tensor(0.1))))))
    y.backward(gy)
    g_b = B.round(gy)
    assert torch.equal(x.grad.to(B.dtype), torch.where(x_f > 0, g_b, B.mul(g_b, float(B.round(torch.tensor(0.1))))))
    x.grad = None
    gen = torch.Generator().manual_seed(3)
    y = PF.dropout(x, 0.3, True, lp, generator=gen)
    kept = y != 0
    s_f = float(F.round(torch.tensor(1 / 0.7)))
    assert 80 < int(kept.sum()) < 180
    assert torch.equal(y[kept], F.mul(x_f, s_f)[kept])
    y.backward(gy)
    s_b = float(B.round(torch.tensor(1 / 0.7)))
    assert torch.equal(x.grad.to(B.dtype)[kept], B.mul(g_b, s_b)[kept]) and not x.grad[~kept].any()
    assert PF.dropout(x, 0.3, False, lp) is x


def test_batch_norm_bit_exact():
    lp = MIXED
    F, B, G, O = lp.forward, lp.backward, lp.gradient, lp.optimizer
    n, c, h = 4, 3, 5
    x = torch.randn(n, c, h, h, dtype=F64, requires_grad=True)
    gamma, beta = as_param(O, 1 + 0.2 * torch.randn(c)), as_param(O, 0.1 * torch.randn(c))
    rm, rv = O.round(torch.zeros(c)), O.round(torch.ones(c))
    y = PF.batch_norm(x, rm, rv, gamma, beta, True, 0.125, 1e-5, lp)
    gy = posit_randn(P16, *y.shape)
    from_positnn_loss(y, n).backward(gy)
    # The reference composition, written out: channels first, M = N*H*W.
    cf = lambda t: t.transpose(0, 1).reshape(c, -1)  # noqa: E731
    xf = cf(F.round(x.detach()))
    m = float(xf.shape[1])
    mean = F.div(quire.sum(xf, 1, F), m)
    d = F.sub(xf, mean[:, None])
    sq = quire.matmul(d.unsqueeze(1), d.unsqueeze(2), F).reshape(c)
    inv = F.div(1.0, F.sqrt(F.add(F.div(sq, m), 1e-5)))
    xhat = F.mul(d, inv[:, None])
    yref = F.fma(F.round(gamma.detach())[:, None], xhat, F.round(beta.detach())[:, None])
    assert torch.equal(cf(y), yref)
    assert torch.equal(rm, O.fma(0.125, O.sub(mean, O.round(torch.zeros(c))), O.round(torch.zeros(c))))
    g = cf(gy)
    gg, xg = G.round(g), G.round(xhat)
    assert torch.equal(gamma.grad, _reference_param_grad(quire.matmul(gg.unsqueeze(1), xg.unsqueeze(2), G).reshape(c), n, lp))
    assert torch.equal(beta.grad, _reference_param_grad(quire.sum(gg, 1, G), n, lp))
    gb, xb = B.round(g), B.round(xhat)
    dxhat = B.mul(gb, B.round(gamma.detach())[:, None])
    a = B.div(quire.sum(dxhat, 1, B), m)
    bb = B.div(quire.matmul(dxhat.unsqueeze(1), xb.unsqueeze(2), B).reshape(c), m)
    gx = B.mul(B.fma(-xb, bb[:, None], B.sub(dxhat, a[:, None])), B.round(inv)[:, None])
    assert torch.equal(cf(x.grad).to(B.dtype), gx)


def test_cross_entropy_and_log_softmax_bit_exact():
    for reduction in ("positnn", "mean"):
        lp = LayerPolicy(loss=P12, forward=P8, grad_reduction=reduction)
        L = lp.loss
        x = torch.randn(6, 5, dtype=F64, requires_grad=True)
        t = torch.randint(0, 5, (6,))
        loss = PF.cross_entropy(x, t, lp)
        xl = L.round(x.detach())
        z = L.sub(xl, xl.amax(1, keepdim=True))
        e = L.exp(z)
        s = quire.sum(e, 1, L, keepdim=True)
        per = L.sub(L.log(s), z.gather(1, t[:, None])).reshape(-1)
        assert torch.equal(loss, L.div(quire.sum(per, 0, L), 6.0))
        loss.backward()
        sm = L.div(e, s)
        g = sm.scatter(1, t[:, None], L.fam(e.gather(1, t[:, None]), -s, L.div(1.0, s)))
        assert torch.equal(x.grad.to(L.dtype), g if reduction == "positnn" else L.mul(g, 1 / 6))
        x.grad = None
        PF.cross_entropy(x, t, lp, target_grad="divide").backward()
        g = sm.scatter(1, t[:, None], L.sub(sm.gather(1, t[:, None]), 1.0))
        assert torch.equal(x.grad.to(L.dtype), g if reduction == "positnn" else L.mul(g, 1 / 6))
    lp = LayerPolicy(loss=P12)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    y = PF.log_softmax(x, 1, lp)
    xl = P12.round(x.detach())
    z = P12.sub(xl, xl.amax(1, keepdim=True))
    assert torch.equal(y, P12.sub(z, P12.log(quire.sum(P12.exp(z), 1, P12, keepdim=True))))


def _ce_grad_oracle(x, t, n, es, target_grad):
    """softmax - onehot of PositNN's cross entropy in posit(n, es), from Fractions: z =
    x - max, e = exp(z) (float64, rounded), s = the exact sum rounded, e_k / s rounded, and
    for the target fam_universal(e_t, -s, round(1/s)) or round(round(e_t / s) - 1)."""
    out = []
    for row, k in zip(x.tolist(), t.tolist()):
        xl = [round_exact(Fraction(v), n, es) for v in row]
        z = [round_exact(v - max(xl), n, es) for v in xl]
        e = [round_exact(Fraction(math.exp(float(v))), n, es) for v in z]
        s = round_exact(sum(e), n, es)
        g = [round_exact(v / s, n, es) for v in e]
        g[k] = (fam_universal(e[k], -s, round_exact(1 / s, n, es), n, es) if target_grad == "fam"
                else round_exact(g[k] - 1, n, es))
        out.append([float(v) for v in g])
    return torch.tensor(out, dtype=F64)


def test_cross_entropy_target_gradient_is_positnn_fam():
    """The target-class gradient is PositNN's (e_t - s) * (1/s) with one rounding, not
    round(e_t / s) - 1: row 0 in posit(8,2) is a confident right answer (e = [1, 0.140625],
    s = 1.125) where the two differ (-0.109375 against -0.125); the other rows are random."""
    p8 = Posit(8, 2)
    lp = LayerPolicy(loss=p8, grad_reduction="positnn")
    x = torch.cat([torch.tensor([[0.0, -2.0, -30.0, -30.0]], dtype=F64), torch.randn(40, 4, dtype=F64) * 3])
    t = torch.cat([torch.tensor([0]), torch.randint(0, 4, (40,))])
    fam, divide = _ce_grad_oracle(x, t, 8, 2, "fam"), _ce_grad_oracle(x, t, 8, 2, "divide")
    assert fam[0, 0].item() == -0.109375 and divide[0, 0].item() == -0.125
    for target_grad, expected in (("fam", fam), ("divide", divide)):
        xr = x.clone().requires_grad_(True)
        PF.cross_entropy(xr, t, lp, target_grad=target_grad).backward()
        assert torch.equal(xr.grad.double(), expected), target_grad
    crit = pnn.CrossEntropyLoss(lp)
    xr = x.clone().requires_grad_(True)
    crit(xr, t).backward()
    assert torch.equal(xr.grad.double(), fam)
    with pytest.raises(ValueError, match="target_grad must be one of"):
        PF.cross_entropy(x, t, lp, target_grad="exact")
    with pytest.raises(ValueError, match="target_grad must be one of"):
        pnn.CrossEntropyLoss(lp, target_grad="fma")


def test_mse_loss_bit_exact():
    lp = LayerPolicy(loss=P12, grad_reduction="positnn")
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    tgt = torch.randn(4, 3, dtype=F64)
    loss = PF.mse_loss(x, tgt, lp)
    d = P12.sub(P12.round(x.detach()), P12.round(tgt))
    assert torch.equal(loss, P12.div(quire.dot(d.reshape(-1), d.reshape(-1), P12), 12.0))
    loss.backward()
    assert torch.equal(x.grad.to(P12.dtype), P12.mul(d, 2.0 / 3.0))  # 2 d / D, D = 3 features


def test_nar_propagates_and_is_counted():
    stats = LayerStats()
    x = posit_randn(P8, 3, 4)
    x[1, 2] = float("nan")
    w = as_param(P16, torch.randn(2, 4))
    y = PF.linear(x, w, None, MIXED, stats=stats)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()
    assert stats.as_dict()["forward"]["nar"] == 2
    big = PF.linear(torch.full((1, 4), 1e30), w.detach().abs() + 1, None, MIXED, stats=stats)
    assert torch.all(big == P8.maxpos) and stats.as_dict()["forward"]["saturation"] == 2
