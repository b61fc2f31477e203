"""The models positnn trains, as plain torch modules: the PositNN paper's LeNet-5 and
CifarNet, an MLP, the CIFAR ResNet-20 and a character-level GPT.

The paper's models are ``nn.Sequential``s of named layers (``conv1``, ``pool1``, ...,
``fc1``, ``fc2``), so precision policies select layers by name or glob (``"fc*"``), with
torch's default initialisation, so a posit model starts from the same seeded float
weights. ResNet-20 and the GPT are ordinary modules with their own ``forward``
(residual adds, attention), which ``convert`` runs through the any-model engine. Models
return logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeNet5", "CifarNet", "MLP", "ResNet20", "GPT", "lenet5", "cifarnet", "mlp", "resnet20", "gpt",
           "build_model", "MODELS"]


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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and the identity shortcut; a stride-2 block subsamples the
    shortcut and pads its new channels with zeros (He et al.'s option A: no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu2(out + shortcut)


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016): a 3x3 stem, three stages of three
    BasicBlocks (16, 32, 64 channels), global average pooling and a linear classifier;
    0.27 M parameters. Takes 32x32 RGB or 28x28 grayscale input (``in_channels``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, width = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stages.append(nn.Sequential(*[BasicBlock(width if i == 0 else planes, planes, stride if i == 0 else 1)
                                          for i in range(blocks)]))
            width = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one projection to q, k, v, scaled dot-product
    attention with a causal mask, an output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)), GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(n_embd, 4 * n_embd, bias=bias)), ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(4 * n_embd, n_embd, bias=bias)), ("dropout", nn.Dropout(dropout)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A character-level GPT in nanoGPT's shape: token and position embeddings, pre-LN
    blocks, a final LayerNorm and an LM head tied to the token embedding. Initialised as
    GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""

    def __init__(self, vocab_size: int = 65, block_size: int = 64, n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 128, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([GPTBlock(n_embd, n_head, dropout, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than the block size {self.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T), one at a time."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :].double() / temperature
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """Build the CIFAR ResNet-20 (0.27 M parameters); ``in_channels=1`` for 28x28 grayscale."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels)


def gpt(num_classes: int = 65, **kwargs: Any) -> GPT:
    """Build a character-level GPT with a vocabulary of ``num_classes`` symbols (nanoGPT's
    CPU shakespeare_char shape by default: 4 layers, 4 heads, 128 wide, block 64)."""
    return GPT(vocab_size=num_classes, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "cifarnet": cifarnet,
    "mlp": mlp,
    "resnet20": resnet20,
    "gpt": gpt,
}


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` ("lenet5", "cifarnet", "mlp", "resnet20", "gpt").

    ``name`` is case-insensitive ("LeNet-5" and "lenet_5" work too); ``num_classes`` and
    any keyword arguments go to the model's builder (e.g. ``in_channels`` for lenet5,
    ``hidden`` for mlp). Raises ``ValueError`` listing the choices for an unknown name.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[key](num_classes=num_classes, **kwargs)
