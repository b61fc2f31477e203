"""Loss modules computed in the L stage, with NaR checks.

A NaR (NaN) loss either raises ``FloatingPointError`` naming the batch (the count of
calls of this loss module since construction or :meth:`reset_batches`), or is counted in
``posit_stats`` and warned about, per ``on_nar`` ("raise" or "report"; default from the
policy).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import functional as PF
from ..policy import ON_NAR
from ._base import PolicySpec, PositModule


class _Loss(PositModule):
    def __init__(self, policy: PolicySpec = None, name: str = "loss", *, on_nar: str | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(policy, name)
        if reduction != "mean":
            raise ValueError(f"posit losses support reduction='mean' only (the gradient reduction is the policy's "
                             f"grad_reduction), got {reduction!r}")
        on_nar = self.policy.on_nar if on_nar is None else on_nar
        if on_nar not in ON_NAR:
            raise ValueError(f"on_nar must be one of {ON_NAR}, got {on_nar!r}")
        self.on_nar, self.batch = on_nar, 0

    def reset_batches(self) -> None:
        """Restart the batch count that NaR errors report."""
        self.batch = 0

    def _check(self, loss: torch.Tensor) -> torch.Tensor:
        self.batch += 1
        self.posit_stats.record("loss", loss, self.policy.loss)
        if torch.isnan(loss).any():
            msg = (f"NaR in the loss at batch {self.batch} (call {self.batch} of this {type(self).__name__}); "
                   f"see positnn.stats.counters(model) for where NaR and saturation appeared")
            if self.policy.loss is None:
                self.posit_stats.add("loss", "nar")  # record() counts posit stages only
            if self.on_nar == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return loss

    def extra_repr(self) -> str:
        return (f"L={self.policy.loss or 'float'} quire={self.policy.quire} reduction={self.policy.grad_reduction} "
                f"on_nar={self.on_nar}")


class CrossEntropyLoss(_Loss):
    """Cross entropy of logits and class indices in L: softmax as exp(x - max) with an L
    quire sum, gradient softmax - onehot (unscaled under the "positnn" reduction), its
    target-class term rounded as ``target_grad`` says (``positnn.functional.cross_entropy``;
    default "fam", PositNN's)."""

    def __init__(self, policy: PolicySpec = None, name: str = "loss", *, on_nar: str | None = None,
                 reduction: str = "mean", weight: torch.Tensor | None = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, target_grad: str = "fam") -> None:
        super().__init__(policy, name, on_nar=on_nar, reduction=reduction)
        if weight is not None or label_smoothing != 0.0:
            raise ValueError("posit CrossEntropyLoss supports neither class weights nor label smoothing")
        if target_grad not in PF.CE_TARGET_GRADS:
            raise ValueError(f"target_grad must be one of {PF.CE_TARGET_GRADS}, got {target_grad!r}")
        self.ignore_index, self.target_grad = ignore_index, target_grad

    @classmethod
    def from_float(cls, module: nn.CrossEntropyLoss, policy: PolicySpec = None, name: str = "loss") -> "CrossEntropyLoss":
        return cls(policy, name, reduction=module.reduction, weight=module.weight,
                   ignore_index=module.ignore_index, label_smoothing=module.label_smoothing)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if (target == self.ignore_index).any():
            raise ValueError(f"posit CrossEntropyLoss does not support ignore_index (target holds {self.ignore_index})")
        return self._check(PF.cross_entropy(x, target, self.policy, target_grad=self.target_grad))


class MSELoss(_Loss):
    """Mean squared error in L, the sum of squares in one L quire."""

    @classmethod
    def from_float(cls, module: nn.MSELoss, policy: PolicySpec = None, name: str = "loss") -> "MSELoss":
        return cls(policy, name, reduction=module.reduction)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._check(PF.mse_loss(x, target, self.policy))
