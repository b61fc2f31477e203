"""Linear and Conv2d: O master weights, F/B copies, quire dot products (see functional)."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as PF
from ._base import PolicySpec, PositModule


class Linear(PositModule):
    """y = x W^T + b, forward in F with the bias inside the quire; backward in B and G;
    master W and b in O. Initialised as ``torch.nn.Linear`` then rounded to O."""

    _master_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, policy: PolicySpec = None,
                 name: str = "", *, dtype: torch.dtype | None = None) -> None:
        super().__init__(policy, name)
        self.in_features, self.out_features = in_features, out_features
        ref = nn.Linear(in_features, out_features, bias, dtype=dtype)
        self.weight = nn.Parameter(self._master(ref.weight))
        self.bias = nn.Parameter(self._master(ref.bias)) if bias else None
        self._tag_params()

    @classmethod
    def from_float(cls, module: nn.Linear, policy: PolicySpec = None, name: str = "") -> "Linear":
        """A posit Linear holding ``module``'s weights rounded to O."""
        new = cls(module.in_features, module.out_features, module.bias is not None, policy, name)
        with torch.no_grad():
            new.weight = nn.Parameter(new._master(module.weight))
            new.bias = nn.Parameter(new._master(module.bias)) if module.bias is not None else None
        new.weight.requires_grad_(module.weight.requires_grad)
        new._tag_params()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        return PF.linear(
            x, self.weight, self.bias, self.policy,
            weight_f=self._copy("weight", "forward"),
            weight_b=self._copy("weight", "backward") if grad else self.weight.detach(),
            bias_f=self._copy("bias", "forward"), stats=self.posit_stats,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {super().extra_repr()}"


def _padding(padding, kernel_size, dilation) -> tuple[int, int]:
    """Numeric padding from torch's int/tuple/"valid"/"same" (symmetric "same" only)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {kernel_size} and dilation {dilation} is asymmetric; "
                             f"posit Conv2d supports symmetric padding only")
        return (total[0] // 2, total[1] // 2)
    return tuple(padding) if not isinstance(padding, int) else (padding, padding)


class Conv2d(PositModule):
    """2-D convolution with one F quire per output (bias inside), input error as a B
    convolution with the rotated kernel, weight gradient in G quires; master in O.
    Zero padding only (``padding_mode="zeros"``)."""

    _master_names = ("weight", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", policy: PolicySpec = None,
                 name: str = "", *, dtype: torch.dtype | None = None) -> None:
        super().__init__(policy, name)
        if padding_mode != "zeros":
            raise ValueError(f"posit Conv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, dtype=dtype)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = ref.kernel_size, ref.stride, ref.dilation
        self.padding = _padding(ref.padding, ref.kernel_size, ref.dilation)
        self.weight = nn.Parameter(self._master(ref.weight))
        self.bias = nn.Parameter(self._master(ref.bias)) if bias else None
        self._tag_params()

    @classmethod
    def from_float(cls, module: nn.Conv2d, policy: PolicySpec = None, name: str = "") -> "Conv2d":
        """A posit Conv2d with ``module``'s geometry and weights rounded to O."""
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, policy, name)
        with torch.no_grad():
            new.weight = nn.Parameter(new._master(module.weight))
            new.bias = nn.Parameter(new._master(module.bias)) if module.bias is not None else None
        new._tag_params()
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        return PF.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.policy,
            weight_f=self._copy("weight", "forward"),
            weight_b=self._copy("weight", "backward") if grad else self.weight.detach(),
            bias_f=self._copy("bias", "forward"), stats=self.posit_stats,
        )

    def extra_repr(self) -> str:
        geo = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
               f"padding={self.padding}")
        if self.dilation != (1, 1):
            geo += f", dilation={self.dilation}"
        if self.groups != 1:
            geo += f", groups={self.groups}"
        return f"{geo}, bias={self.bias is not None}, {PositModule.extra_repr(self)}"

