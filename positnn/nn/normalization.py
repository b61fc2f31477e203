"""BatchNorm1d and BatchNorm2d: statistics with quires, affine parameters in O."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as PF
from ._base import PolicySpec, PositModule


class _BatchNorm(PositModule):
    """Batch normalisation over channel dim 1. gamma/beta have O masters (F and B copies);
    the running statistics are O buffers (bit patterns in the state dict)."""

    _master_names = ("weight", "bias", "running_mean", "running_var")
    _dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, policy: PolicySpec = None, name: str = "", *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(policy, name)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        O = self.policy.optimizer
        dtype = O.dtype if O is not None else (dtype or torch.get_default_dtype())
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, dtype=dtype))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._tag_params()

    @classmethod
    def from_float(cls, module: nn.modules.batchnorm._BatchNorm, policy: PolicySpec = None, name: str = ""):
        """A posit batch norm with ``module``'s parameters and statistics rounded to O."""
        src = module.weight if module.weight is not None else module.running_mean
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, policy,
                  name, dtype=None if src is None else src.dtype)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(module, attr)
                if src is not None:
                    getattr(new, attr).copy_(new._master(src))
            if module.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._dims:
            raise ValueError(f"{type(self).__name__} expects {' or '.join(f'{d}-D' for d in self._dims)} input, got {x.dim()}-D")
        use_batch = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch
                momentum = 1.0 / float(self.num_batches_tracked)
        grad = torch.is_grad_enabled()
        running = self.training and self.track_running_stats or not use_batch
        return PF.batch_norm(
            x, self.running_mean if running else None, self.running_var if running else None,
            self.weight, self.bias, use_batch, momentum, self.eps, self.policy,
            weight_f=self._copy("weight", "forward"),
            weight_b=self._copy("weight", "backward") if grad else None,
            bias_f=self._copy("bias", "forward"), stats=self.posit_stats,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, {super().extra_repr()}"


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input."""

    _dims = (4,)
