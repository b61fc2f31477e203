"""Tests for positnn.models: the paper's architectures, layer names and the registry."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from positnn.models import CifarNet, LeNet5, MLP, build_model, cifarnet, lenet5, mlp

ALLOWED = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.ReLU, nn.Flatten, nn.Dropout, nn.Sigmoid,
           nn.Tanh)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children()]


def test_lenet5_parameter_count_is_the_papers():
    assert n_params(lenet5()) == 61_706


def test_lenet5_layers_in_order_with_pool_before_relu():
    m = lenet5()
    assert names(m) == ["conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "conv3", "relu3",
                        "flatten", "fc1", "relu4", "fc2"]
    kinds = [type(c) for c in m.children()]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.ReLU,
                     nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size, m.conv1.padding) == \
        (1, 6, (5, 5), (2, 2))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.padding) == (6, 16, (0, 0))
    assert (m.conv3.in_channels, m.conv3.out_channels, m.conv3.kernel_size) == (16, 120, (5, 5))
    assert (m.fc1.in_features, m.fc1.out_features, m.fc2.out_features) == (120, 84, 10)
    assert m.pool1.kernel_size == 2 and m.pool2.kernel_size == 2


def test_lenet5_forward_gives_logits():
    m = lenet5()
    out = m(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # raw logits, no softmax
    assert lenet5(num_classes=7)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert lenet5(in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_cifarnet_shapes_and_layers():
    m = cifarnet()
    assert names(m) == ["conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "flatten",
                        "dropout1", "fc1", "relu3", "dropout2", "fc2", "relu4", "fc3"]
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.padding) == (3, 8, (2, 2))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.padding) == (8, 16, (2, 2))
    assert m.dropout1.p == 0.5 and m.dropout2.p == 0.5
    assert (m.fc1.in_features, m.fc1.out_features) == (1024, 384)
    assert (m.fc2.in_features, m.fc2.out_features) == (384, 192)
    x = torch.randn(2, 3, 32, 32)
    assert m[:7](x).shape == (2, 1024)
    assert m(x).shape == (2, 10)
    assert n_params(m) == 608 + 3_216 + 393_600 + 73_920 + 1_930
    m100 = cifarnet(num_classes=100).eval()
    assert m100(x).shape == (2, 100)
    assert torch.equal(m100(x), m100(x))  # dropout off in eval


def test_mlp_defaults_and_options():
    m = mlp()
    assert names(m) == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3"]
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert n_params(m) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    t = mlp(in_features=64, hidden=(32,), num_classes=3, activation="Tanh", dropout=0.2)
    assert names(t) == ["flatten", "fc1", "tanh1", "dropout1", "fc2"]
    assert isinstance(t.tanh1, nn.Tanh) and t.dropout1.p == 0.2
    assert t(torch.randn(5, 8, 8)).shape == (5, 3)
    assert isinstance(mlp(activation="sigmoid").sigmoid1, nn.Sigmoid)
    assert names(mlp(hidden=())) == ["flatten", "fc1"]
    with pytest.raises(ValueError, match="relu, sigmoid, tanh"):
        mlp(activation="gelu")
    with pytest.raises(ValueError):
        mlp(dropout=1.0)


@pytest.mark.parametrize("model", [lenet5(), cifarnet(), mlp(dropout=0.1), mlp(activation="tanh")])
def test_only_supported_layer_types(model):
    for sub in model.modules():
        if sub is model:
            continue
        assert isinstance(sub, ALLOWED), type(sub)


def test_layer_names_select_by_glob():
    m = lenet5()
    assert fnmatch.filter(names(m), "fc*") == ["fc1", "fc2"]
    assert fnmatch.filter(names(m), "conv*") == ["conv1", "conv2", "conv3"]
    assert [n for n, _ in m.named_parameters()][:2] == ["conv1.weight", "conv1.bias"]


def test_seeded_default_init_is_reproducible():
    torch.manual_seed(123)
    a = lenet5()
    torch.manual_seed(123)
    b = lenet5()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_registry():
    assert isinstance(build_model("lenet5", 10), LeNet5)
    assert isinstance(build_model("LeNet-5", num_classes=10), LeNet5)
    assert isinstance(build_model("CifarNet", 100), CifarNet)
    assert build_model("cifarnet", 100).fc3.out_features == 100
    m = build_model("mlp", 5, in_features=12, hidden=(6,))
    assert isinstance(m, MLP) and m(torch.randn(2, 12)).shape == (2, 5)
    assert build_model("lenet5", 10, in_channels=3).conv1.in_channels == 3
    with pytest.raises(ValueError, match="lenet5, cifarnet, mlp, resnet20, gpt"):
        build_model("resnet18", 10)


def test_resnet20_is_he_et_al_cifar_resnet():
    from positnn.models import resnet20

    m = resnet20()
    assert sum(p.numel() for p in m.parameters()) == 269_722  # 0.27 M with option-A shortcuts
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 19 and sum(isinstance(x, nn.Linear) for x in m.modules()) == 1  # 19 + 1 = 20 layers
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert resnet20(num_classes=7, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_gpt_has_nanogpt_shape_and_a_tied_head():
    from positnn.models import gpt

    m = gpt(65)
    assert m.lm_head.weight is m.wte.weight
    assert sum(p.numel() for p in m.parameters()) == 804_096  # nanoGPT prints 0.80M for this config
    idx = torch.randint(0, 65, (3, 64))
    assert m(idx).shape == (3, 64, 65)
    # Causal: changing a later token never changes an earlier position's logits.
    m.eval()
    later = idx.clone()
    later[:, 40:] = (later[:, 40:] + 1) % 65
    assert torch.allclose(m(idx)[:, :40], m(later)[:, :40])
    with pytest.raises(ValueError, match="block size 64"):
        m(torch.randint(0, 65, (1, 65)))
    out = m.generate(idx[:1, :5], 7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 12) and torch.equal(out[:, :5], idx[:1, :5])
