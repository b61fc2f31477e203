"""convert(): float pseudo-formats reproduce torch; posit policies reach the right layers;
unsupported modules are all listed."""

import copy

import pytest
import torch
from torch import nn

import positnn.nn as pnn
from positnn import Posit
from positnn.convert import convert
from positnn.engine import UnsupportedOpError
from positnn.models import lenet5, mlp
from positnn.policy import Policy

P8, P16 = Posit(8, 2), Posit(16, 2)


class BNNet(nn.Module):
    """A small CNN with batch norm, avg pooling, leaky ReLU, dropout and a nested block."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                                      nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, stride=2), nn.Tanh())
        self.head = nn.ModuleDict({"flat": nn.Flatten(), "drop": nn.Dropout(0.2), "fc": nn.Linear(24, 8),
                                   "bn": nn.BatchNorm1d(8), "act": nn.Sigmoid(), "out": nn.Linear(8, 3)})

    def forward(self, x):
        x = self.features(x)
        for name in ("flat", "drop", "fc", "bn", "act", "out"):
            x = self.head[name](x)
        return x


MODELS = {
    "lenet5": (lambda: lenet5(), (3, 1, 28, 28)),
    "bnnet": (BNNet, (4, 1, 10, 10)),
    "mlp": (lambda: mlp(in_features=12, hidden=(7, 5), activation="tanh"), (4, 12)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_float_policy_equals_torch(name):
    build, shape = MODELS[name]
    model = build()
    pmodel = convert(model, "float32")
    # All-float layers stay torch's own modules: the converted model is torch's, bit for bit
    # (positnn's float module paths are checked against torch in test_nn / test_functional).
    assert not any(isinstance(m, pnn.PositModule) for m in pmodel.modules())
    x = torch.randn(*shape)
    t = torch.randint(0, 3, (shape[0],))
    torch.manual_seed(5)
    y = pmodel(x)
    torch.manual_seed(5)  # the same dropout masks
    y_ref = model(x)
    assert torch.equal(y, y_ref)
    pnn.CrossEntropyLoss("float32")(y, t).backward()
    nn.functional.cross_entropy(y_ref, t).backward()
    for (n, p), (_, q) in zip(pmodel.named_parameters(), model.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n


@pytest.mark.parametrize("name", list(MODELS))
def test_float64_gradcheck_of_converted_models(name):
    build, shape = MODELS[name]
    small = (2, 1, 28, 28) if name == "lenet5" else (3,) + shape[1:]
    model = convert(build().double(), "float32").eval() if name == "bnnet" else convert(build().double(), "float32")
    x = torch.randn(*small, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters()][-2:]  # the last layer's weight and bias, plus the input
    assert torch.autograd.gradcheck(lambda x, *ps: model(x), (x, *params), atol=1e-6, rtol=1e-4, fast_mode=True)


def test_per_layer_overrides_reach_the_right_layers():
    policy = Policy.from_dict({"recipe": "posit8-O16-L16q", "layers": {"conv1": {"forward": "posit(16,1)"}}})
    model = convert(lenet5(), policy)
    assert model.conv1.policy.forward == Posit(16, 1) and model.conv1.policy.backward == P8
    for name in ("conv2", "conv3", "fc1", "fc2", "pool1", "relu1"):
        assert getattr(model, name).policy.forward == P8, name
    x = torch.randn(2, 1, 28, 28)
    h = model.conv1(x)
    assert torch.equal(h, Posit(16, 1).round(h)) and not torch.equal(h, P8.round(h))
    assert torch.equal(model.conv2(h), P8.round(model.conv2(h)))
    glob = convert(BNNet(), {"recipe": "posit8q", "layers": {"head.*": {"optimizer": "posit(16,2)"}}})
    assert glob.head["fc"].weight.dtype == P16.dtype and glob.head["fc"].policy.optimizer == P16
    assert glob.features[0].policy.optimizer == P8


def test_weights_rounded_to_O_and_original_untouched():
    model = lenet5()
    before = copy.deepcopy(model.state_dict())
    pmodel = convert(model, "posit8-O16-L16q")
    assert torch.equal(pmodel.conv1.weight, P16.round(model.conv1.weight.detach()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert type(model.conv1) is nn.Conv2d
    same = convert(model, "posit8-O16-L16q", inplace=True)
    assert same is model and isinstance(model.conv1, pnn.Conv2d)
    assert convert(same, "posit8-O16-L16q") is not same  # already converted: kept as is
    assert isinstance(convert(nn.Linear(2, 2), "posit8q"), pnn.Linear)


def test_modules_without_a_positnn_layer_run_under_the_engine_and_unknown_ops_raise():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    class Spectral(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).real

    model = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.Sequential(nn.Softmax(dim=1), nn.Identity()), Custom())
    pm = convert(model, "posit8q")
    y = pm(torch.randn(3, 2))
    assert torch.equal(y, Posit(8, 2).round(y))
    with pytest.raises(UnsupportedOpError, match=r"aten\._fft_r2c.*'1'"):
        convert(nn.Sequential(nn.Linear(4, 4), Spectral()), "posit8q")(torch.randn(2, 4))


def test_policy_pattern_typos_are_errors():
    with pytest.raises(ValueError, match="conv9"):
        convert(lenet5(), {"recipe": "posit8q", "layers": {"conv9": {"forward": "posit16"}}})
