"""Posit modules: O masters, refreshed F/B copies, repr, state dicts of bit patterns,
deepcopy, batch norm, losses and NaR handling."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import positnn.nn as pnn
from positnn import Posit, stats
from positnn.policy import Policy

P8, P16 = Posit(8, 2), Posit(16, 2)
RECIPE = "posit8-O16-L16q"


def test_linear_masters_in_O_and_copies_refresh_after_update():
    torch.manual_seed(0)
    ref = nn.Linear(5, 3)
    m = pnn.Linear.from_float(ref, RECIPE, "fc")
    assert m.weight.dtype == P16.dtype and torch.equal(m.weight, P16.round(ref.weight.detach()))
    assert m.weight.posit_policy.optimizer == P16
    w_f = m._copy("weight", "forward")
    assert torch.equal(w_f, P8.round(m.weight.detach()))
    assert m._copy("weight", "forward") is w_f  # cached while the master is unchanged
    with torch.no_grad():
        m.weight.add_(1.0)
    assert torch.equal(m._copy("weight", "forward"), P8.round(m.weight.detach()))
    text = repr(m)
    assert "F=posit(8,2)" in text and "O=posit(16,2)" in text and "quire=exact" in text


def test_module_forward_equals_functional_and_rounds_input():
    torch.manual_seed(1)
    conv = pnn.Conv2d.from_float(nn.Conv2d(2, 3, 3, padding="same"), RECIPE)
    assert conv.padding == (1, 1)
    x = torch.randn(2, 2, 5, 5)
    y = conv(x)
    import positnn.functional as PF
    assert torch.equal(y, PF.conv2d(P8.round(x), conv.weight, conv.bias, 1, 1, 1, 1, conv.policy))
    assert torch.equal(conv(x), conv(P8.round(x)))


def test_state_dict_bit_patterns_round_trip_and_explicit_conversion():
    torch.manual_seed(2)
    model = nn.Sequential(pnn.Linear(4, 3, policy=RECIPE), pnn.BatchNorm1d(3, policy=RECIPE))
    model(torch.randn(8, 4))  # move the running statistics
    sd = model.state_dict()
    assert sd["0.weight"].dtype == torch.int16 and sd["1.running_mean"].dtype == torch.int16
    assert sd["0._extra_state"]["formats"]["weight"] == "posit(16,2)"
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = nn.Sequential(pnn.Linear(4, 3, policy=RECIPE), pnn.BatchNorm1d(3, policy=RECIPE))
    other.load_state_dict(torch.load(buf))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    assert torch.equal(other[0].weight, model[0].weight)
    # Another format: refused unless converting explicitly.
    narrow = nn.Sequential(pnn.Linear(4, 3, policy="posit8q"), pnn.BatchNorm1d(3, policy="posit8q"))
    with pytest.raises(RuntimeError, match="convert_format=True"):
        narrow.load_state_dict(sd)
    pnn.load_state_dict(narrow, sd, convert_format=True)
    assert torch.equal(narrow[0].weight, P8.round(model[0].weight.detach()))
    # A float checkpoint into a posit model is a conversion too.
    flat = nn.Sequential(nn.Linear(4, 3))
    posit_lin = nn.Sequential(pnn.Linear(4, 3, policy=RECIPE))
    with pytest.raises(RuntimeError, match="saved as float"):
        posit_lin.load_state_dict(flat.state_dict())
    posit_lin[0].load_state_dict(flat[0].state_dict(), convert_format=True)
    assert torch.equal(posit_lin[0].weight, P16.round(flat[0].weight.detach()))


def test_deepcopy_and_pickle_keep_parameter_tags():
    m = pnn.Linear(3, 2, policy=RECIPE)
    for clone in (copy.deepcopy(m), _pickled(m)):
        assert clone.weight.posit_policy == m.policy and clone.weight.posit_stats is clone.posit_stats


def _pickled(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("cls, tcls, shape", [(pnn.BatchNorm1d, nn.BatchNorm1d, (8, 3)),
                                              (pnn.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 5))])
def test_batch_norm_module_float_equals_torch(cls, tcls, shape):
    ref = tcls(3, momentum=None)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    m = cls.from_float(ref, "float32")
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    for _ in range(2):
        y, y2 = m(x), ref(x2)
        assert torch.allclose(y, y2, atol=1e-5)
    y.sum().backward()
    y2.sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(m.weight.grad, ref.weight.grad, atol=1e-4)
    assert torch.allclose(m.running_var, ref.running_var) and int(m.num_batches_tracked) == 2
    m.eval(), ref.eval()
    assert torch.allclose(m(x), ref(x), atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 3, 4, 4, 4))


def test_posit_batch_norm_trains_in_posits():
    m = pnn.BatchNorm2d(3, policy=RECIPE)
    y = m(torch.randn(4, 3, 5, 5) * 3 + 1)
    assert torch.equal(y, P8.round(y)) and torch.equal(m.running_mean, P16.round(m.running_mean))
    y.sum().backward()
    assert torch.equal(m.weight.grad, P16.round(m.weight.grad))


def test_losses_check_nar():
    crit = pnn.CrossEntropyLoss(RECIPE)
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 0])
    assert torch.equal(crit(x, t), P16.round(crit(x, t)))
    x[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="batch 3"):
        crit(x, t)
    rep = pnn.CrossEntropyLoss(RECIPE, on_nar="report")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.isnan(rep(x, t))
    assert caught and rep.posit_stats.as_dict()["loss"]["nar"] == 1
    assert stats.counters(nn.Sequential(rep), nonzero=True) == {"0": {"loss": {"nar": 1, "saturation": 0}}}
    stats.reset(nn.Sequential(rep))
    assert stats.total(nn.Sequential(rep)) == {"nar": 0, "saturation": 0}
    assert pnn.CrossEntropyLoss(Policy(loss=P16, on_nar="report")).on_nar == "report"
    with pytest.raises(ValueError, match="reduction"):
        pnn.MSELoss(RECIPE, reduction="sum")
    mse = pnn.MSELoss(RECIPE)
    assert torch.equal(mse(torch.ones(2, 2), torch.zeros(2, 2)), torch.tensor(1.0))


def test_modules_record_saturation_per_stage():
    m = nn.Sequential(pnn.Linear(3, 2, policy="posit8q"))
    with torch.no_grad():
        m[0].weight.fill_(2.0**20)
    m(torch.full((1, 3), 2.0**10)).sum().backward()
    c = stats.counters(m, nonzero=True)["0"]
    assert c["forward"]["saturation"] == 2
