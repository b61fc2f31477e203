"""Optimizers: posit steps equal the reference formulas rounded in O; float steps equal
torch's; schedulers work; modules see the updated weights."""

import copy

import pytest
import torch
from torch import nn

import positnn.nn as pnn
from positnn import Posit, optim

P8, P16 = Posit(8, 2), Posit(16, 2)
RECIPE = "posit8-O16-L16q"


def _const(x):
    return float(P16.round(torch.tensor(x, dtype=torch.float64)))


def _model_with_grads(seed):
    torch.manual_seed(seed)
    m = pnn.Linear(6, 4, policy=RECIPE)
    for p in m.parameters():
        p.grad = P16.round(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("momentum, dampening, weight_decay, nesterov",
                         [(0.0, 0.0, 0.0, False), (0.5, 0.0, 0.0, False), (0.9, 0.0, 1e-3, True), (0.5, 0.25, 0.01, False)])
def test_sgd_equals_reference_in_O(momentum, dampening, weight_decay, nesterov):
    m = _model_with_grads(0)
    opt = optim.SGD(m.parameters(), lr=0.1, momentum=momentum, dampening=dampening,
                    weight_decay=weight_decay, nesterov=nesterov)
    w = m.weight.detach().clone()
    bufs = None
    for step in range(3):
        g = m.weight.grad.clone()
        if weight_decay:
            g = P16.fma(_const(weight_decay), w, g)
        if momentum:
            if bufs is None:
                bufs = g.clone()
            elif dampening:
                bufs = P16.fma(_const(momentum), bufs, P16.mul(_const(1 - dampening), g))
            else:
                bufs = P16.fma(_const(momentum), bufs, g)
            g = P16.fma(_const(momentum), bufs, g) if nesterov else bufs
        w = P16.fma(-_const(0.1), g, w)
        opt.step()
        assert torch.equal(m.weight.detach(), w), step
        m.weight.grad = P16.round(torch.randn_like(w) * 0.1)


def test_sgd_float_equals_torch_and_scheduler_works():
    torch.manual_seed(1)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    pa = pnn.Linear.from_float(a, "float32")
    opt = optim.SGD(pa.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for _ in range(5):
        x = torch.randn(4, 5)
        for model, o in ((pa, opt), (b, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
        sched.step(), sched_ref.step()
    assert torch.equal(pa.weight, b.weight) and opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.025


@pytest.mark.parametrize("cls, tcls", [(optim.Adam, torch.optim.Adam), (optim.AdamW, torch.optim.AdamW)])
def test_adam_float_equals_torch(cls, tcls):
    torch.manual_seed(2)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    pa = pnn.Linear.from_float(a, "float32")
    opt, ref = cls(pa.parameters(), lr=1e-2, weight_decay=0.1), tcls(b.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        x = torch.randn(4, 5)
        for model, o in ((pa, opt), (b, ref)):
            o.zero_grad()
            model(x).square().sum().backward()
            o.step()
    assert torch.allclose(pa.weight, b.weight, atol=1e-6)


def test_adamw_posit_equals_reference():
    m = _model_with_grads(3)
    opt = optim.AdamW(m.parameters(), lr=1e-2, betas=(0.875, 0.9921875), eps=2.0**-20, weight_decay=0.0625)
    w = m.weight.detach().clone()
    mom, var = torch.zeros_like(w), torch.zeros_like(w)
    for t in (1, 2):
        g = m.weight.grad
        w = P16.fma(-_const(1e-2 * 0.0625), w, w)
        mom = P16.fma(_const(0.875), mom, P16.mul(_const(0.125), g))
        var = P16.fma(_const(0.9921875), var, P16.mul(_const(0.0078125), P16.mul(g, g)))
        denom = P16.add(P16.sqrt(P16.div(var, _const(1 - 0.9921875**t))), _const(2.0**-20))
        w = P16.fma(-_const(1e-2 / (1 - 0.875**t)), P16.div(mom, denom), w)
        opt.step()
        assert torch.equal(m.weight.detach(), w)


def test_step_refreshes_module_copies_and_stays_in_O():
    m = _model_with_grads(4)
    x = torch.randn(3, 6)
    before = m(x)
    optim.SGD(m.parameters(), lr=1.0).step()
    assert torch.equal(m.weight, P16.round(m.weight)) and torch.equal(m._copy("weight", "forward"), P8.round(m.weight))
    assert not torch.equal(m(x), before)


def test_stochastic_rounding_update_is_unbiased_and_in_O():
    torch.manual_seed(5)
    m = pnn.Linear(64, 64, bias=False, policy={"recipe": RECIPE, "rounding": "stochastic"})
    with torch.no_grad():
        m.weight.fill_(1.0)
    m.weight.grad = torch.full_like(m.weight, 2.0**-14)
    optim.SGD(m.parameters(), lr=1.0).step()  # 1 - 2**-14: far below posit(16,2)'s step near 1
    w = m.weight.detach()
    assert torch.equal(w, P16.round(w)) and 0 < int((w < 1).sum()) < w.numel()


def test_invalid_hyperparameters():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD(p, lr=0.1, momentum=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        optim.Adam(p, betas=(1.5, 0.9))


def test_grad_scaler_backs_off_on_saturation_then_unscales():
    torch.manual_seed(6)
    model = nn.Sequential(pnn.Linear(8, 4, policy=RECIPE))
    crit = pnn.CrossEntropyLoss(RECIPE)
    opt = optim.SGD(model.parameters(), lr=1 / 16)
    scaler = optim.GradScaler(model, init_scale=2.0**40, growth_interval=2)
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    steps = []
    for _ in range(4):
        opt.zero_grad()
        scaler.scale(crit(model(x), y)).backward()
        steps.append(scaler.step(opt))
    assert steps[0] is False and scaler.skipped >= 1 and scaler.scale_value < 2.0**40
    # A clean step divides the scaled gradients by S in O: close to the unscaled ones.
    scaled, plain = copy.deepcopy(model), copy.deepcopy(model)
    sc = optim.GradScaler(scaled, init_scale=4.0)
    o1, o2 = optim.SGD(scaled.parameters(), lr=1 / 16), optim.SGD(plain.parameters(), lr=1 / 16)
    sc.scale(crit(scaled(x), y)).backward()
    crit(plain(x), y).backward()
    assert sc.step(o1)
    o2.step()
    assert torch.allclose(scaled[0].weight.grad, plain[0].weight.grad, rtol=0.15, atol=1e-3)
    assert torch.allclose(scaled[0].weight, plain[0].weight, atol=1e-3)
    with pytest.raises(ValueError, match="power of two"):
        optim.GradScaler(model, init_scale=3.0)
