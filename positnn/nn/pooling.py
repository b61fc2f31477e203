"""MaxPool2d and AvgPool2d under a posit policy."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as PF
from ._base import PolicySpec, PositModule


class MaxPool2d(PositModule):
    """Max pooling: exact selection forward, exact routing backward (overlapping windows
    summed in a B quire). ``ceil_mode`` and ``return_indices`` are not supported."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, policy: PolicySpec = None, name: str = "") -> None:
        super().__init__(policy, name)
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation

    @classmethod
    def from_float(cls, module: nn.MaxPool2d, policy: PolicySpec = None, name: str = "") -> "MaxPool2d":
        if module.ceil_mode or module.return_indices:
            raise ValueError("posit MaxPool2d supports ceil_mode=False and return_indices=False only")
        return cls(module.kernel_size, module.stride, module.padding, module.dilation, policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.policy)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, {super().extra_repr()}"


class AvgPool2d(PositModule):
    """Average pooling: window sums in an F quire, divided by the window size in F
    (``count_include_pad=True`` and ``ceil_mode=False`` only)."""

    def __init__(self, kernel_size, stride=None, padding=0, divisor_override: int | None = None,
                 policy: PolicySpec = None, name: str = "") -> None:
        super().__init__(policy, name)
        self.kernel_size, self.stride, self.padding, self.divisor_override = kernel_size, stride, padding, divisor_override

    @classmethod
    def from_float(cls, module: nn.AvgPool2d, policy: PolicySpec = None, name: str = "") -> "AvgPool2d":
        if module.ceil_mode or not module.count_include_pad:
            raise ValueError("posit AvgPool2d supports ceil_mode=False and count_include_pad=True only")
        return cls(module.kernel_size, module.stride, module.padding, module.divisor_override, policy, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PF.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.divisor_override, self.policy,
                             stats=self.posit_stats)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, {super().extra_repr()}"
