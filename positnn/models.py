"""The PositNN paper's models as plain torch modules.

Each model is an ``nn.Sequential`` built from an ordered dict of named layers (``conv1``,
``pool1``, ``relu1``, ..., ``fc1``, ``fc2``): precision policies select layers by those
names with globs such as ``"conv1"`` or ``"fc*"``, and the posit conversion walks the
layers in order. Only Conv2d, Linear, MaxPool2d, ReLU, Flatten, Dropout (and Sigmoid/Tanh
for :func:`mlp`) are used, with torch's default initialisation, so a posit model can start
from the same seeded float weights. Models return logits (no softmax).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

from torch import nn

__all__ = ["LeNet5", "CifarNet", "MLP", "lenet5", "cifarnet", "mlp", "build_model", "MODELS"]


class _NamedSequential(nn.Sequential):
    """``nn.Sequential`` whose slices are plain ``nn.Sequential`` (keeping the layer names):
    the subclasses' constructors take model options, not a dict of layers."""

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class LeNet5(_NamedSequential):
    """LeNet-5 as in PositNN (pooling before ReLU); 61,706 parameters for 1x28x28 input."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)),
            ("pool1", nn.MaxPool2d(2)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(6, 16, kernel_size=5)),
            ("pool2", nn.MaxPool2d(2)),
            ("relu2", nn.ReLU()),
            ("conv3", nn.Conv2d(16, 120, kernel_size=5)),
            ("relu3", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(120, 84)),
            ("relu4", nn.ReLU()),
            ("fc2", nn.Linear(84, num_classes)),
        ]))


class CifarNet(_NamedSequential):
    """PositNN's CifarNet variant for 3x32x32 input (CIFAR-10 / CIFAR-100)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(3, 8, kernel_size=5, padding=2)),
            ("pool1", nn.MaxPool2d(2)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(8, 16, kernel_size=5, padding=2)),
            ("pool2", nn.MaxPool2d(2)),
            ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("dropout1", nn.Dropout(0.5)),
            ("fc1", nn.Linear(16 * 8 * 8, 384)),
            ("relu3", nn.ReLU()),
            ("dropout2", nn.Dropout(0.5)),
            ("fc2", nn.Linear(384, 192)),
            ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(192, num_classes)),
        ]))


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


class MLP(_NamedSequential):
    """Fully connected network: flatten, then (fcK, actK[, dropoutK]) per hidden layer, then
    the output layer ``fc{len(hidden)+1}``."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 128),
                 num_classes: int = 10, activation: str = "relu", dropout: float = 0.0) -> None:
        key = str(activation).lower()
        if key not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of: "
                             f"{', '.join(_ACTIVATIONS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers.append((f"fc{i}", nn.Linear(width, h)))
            layers.append((f"{key}{i}", _ACTIVATIONS[key]()))
            if dropout > 0:
                layers.append((f"dropout{i}", nn.Dropout(dropout)))
            width = h
        layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, num_classes)))
        super().__init__(OrderedDict(layers))


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Build PositNN's LeNet-5 for 28x28 images (MNIST, Fashion-MNIST).

    conv1 (in_channels->6, k5, pad 2) -> pool1 -> relu1 -> conv2 (6->16, k5) -> pool2 ->
    relu2 -> conv3 (16->120, k5) -> relu3 -> flatten -> fc1 (120->84) -> relu4 -> fc2
    (84->num_classes). Pooling comes before ReLU, as in the paper. Returns logits.
    """
    return LeNet5(num_classes=num_classes, in_channels=in_channels)


def cifarnet(num_classes: int = 10) -> CifarNet:
    """Build PositNN's CifarNet for 3x32x32 images (CIFAR-10, CIFAR-100).

    conv1 (3->8, k5, pad 2) -> pool1 -> relu1 -> conv2 (8->16, k5, pad 2) -> pool2 -> relu2
    -> flatten (1024) -> dropout1 (0.5) -> fc1 (1024->384) -> relu3 -> dropout2 (0.5) ->
    fc2 (384->192) -> relu4 -> fc3 (192->num_classes). Returns logits.
    """
    return CifarNet(num_classes=num_classes)


def mlp(in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10,
        activation: str = "relu", dropout: float = 0.0) -> MLP:
    """Build a multilayer perceptron: Flatten, hidden Linear layers, an output Linear.

    ``activation`` is "relu", "sigmoid" or "tanh" (``ValueError`` otherwise); ``dropout``
    > 0 adds a Dropout after each hidden activation. Layers are named ``fc1``, ``fc2``, ...
    (the last is the output layer), ``relu1``/``sigmoid1``/``tanh1``, ``dropout1``, ...
    Returns logits.
    """
    return MLP(in_features=in_features, hidden=hidden, num_classes=num_classes,
               activation=activation, dropout=dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "cifarnet": cifarnet,
    "mlp": mlp,
}


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` ("lenet5", "cifarnet", "mlp").

    ``name`` is case-insensitive ("LeNet-5" and "lenet_5" work too); ``num_classes`` and
    any keyword arguments go to the model's builder (e.g. ``in_channels`` for lenet5,
    ``hidden`` for mlp). Raises ``ValueError`` listing the choices for an unknown name.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[key](num_classes=num_classes, **kwargs)
