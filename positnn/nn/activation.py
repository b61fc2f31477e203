"""Activations, Dropout, Flatten and LogSoftmax under a posit policy."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as PF
from ._base import PolicySpec, PositModule


class ReLU(PositModule):
    """max(x, 0): exact in every format; the error is routed, never rounded."""

    @classmethod
    def from_float(cls, module: nn.ReLU, policy: PolicySpec = None, name: str = "") -> "ReLU":
        return cls(policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.relu(x, self.policy)


class LeakyReLU(PositModule):
    """x or slope * x (rounded in F); backward multiplies by the slope in B."""

    def __init__(self, negative_slope: float = 0.01, policy: PolicySpec = None, name: str = "") -> None:
        super().__init__(policy, name)
        self.negative_slope = float(negative_slope)

    @classmethod
    def from_float(cls, module: nn.LeakyReLU, policy: PolicySpec = None, name: str = "") -> "LeakyReLU":
        return cls(module.negative_slope, policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.leaky_relu(x, self.negative_slope, self.policy, stats=self.posit_stats)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}, {super().extra_repr()}"


class Sigmoid(PositModule):
    """Sigmoid in F (float64 evaluation, one rounding); derivative y - y*y by fma in B."""

    @classmethod
    def from_float(cls, module: nn.Sigmoid, policy: PolicySpec = None, name: str = "") -> "Sigmoid":
        return cls(policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.sigmoid(x, self.policy, stats=self.posit_stats)


class Tanh(PositModule):
    """tanh in F (float64 evaluation, one rounding); derivative 1 - y*y by fma in B."""

    @classmethod
    def from_float(cls, module: nn.Tanh, policy: PolicySpec = None, name: str = "") -> "Tanh":
        return cls(policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.tanh(x, self.policy, stats=self.posit_stats)


class Dropout(PositModule):
    """Inverted dropout, the kept values scaled by 1/(1-p) rounded to F."""

    def __init__(self, p: float = 0.5, policy: PolicySpec = None, name: str = "", *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(policy, name)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.generator = float(p), generator

    @classmethod
    def from_float(cls, module: nn.Dropout, policy: PolicySpec = None, name: str = "") -> "Dropout":
        return cls(module.p, policy, name)  # inplace or not: the same values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.dropout(x, self.p, self.training, self.policy, generator=self.generator)

    def extra_repr(self) -> str:
        return f"p={self.p}, {super().extra_repr()}"


class Flatten(PositModule):
    """Reshape only (no arithmetic, no rounding)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1, policy: PolicySpec = None, name: str = "") -> None:
        super().__init__(policy, name)
        self.start_dim, self.end_dim = start_dim, end_dim

    @classmethod
    def from_float(cls, module: nn.Flatten, policy: PolicySpec = None, name: str = "") -> "Flatten":
        return cls(module.start_dim, module.end_dim, policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class LogSoftmax(PositModule):
    """log_softmax in the L format (the sum of exponentials in an L quire)."""

    def __init__(self, dim: int = 1, policy: PolicySpec = None, name: str = "") -> None:
        super().__init__(policy, name)
        self.dim = dim

    @classmethod
    def from_float(cls, module: nn.LogSoftmax, policy: PolicySpec = None, name: str = "") -> "LogSoftmax":
        if module.dim is None:
            raise ValueError("posit LogSoftmax needs an explicit dim")
        return cls(module.dim, policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.log_softmax(x, self.dim, self.policy)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, L={self.policy.loss or 'float'} quire={self.policy.quire}"
