"""Autograd ops whose forward AND backward run in posit arithmetic, stage by stage.

Each op is one ``torch.autograd.Function``; its forward computes in the layer's F format,
its backward propagates the error in B and forms weight gradients in G, every dot product
going through ``positnn.quire`` in the policy's quire mode (PositNN's semantics, notes
section 4). Loss ops compute in L. Each op computes through its stages
(:class:`~positnn.stage.Stage`): a float stage is torch's own arithmetic, so with every
stage float each op equals its torch counterpart (up to float reassociation) and float
baselines run through the same code.

Parameter gradients: the G result (rounded once from the G quire) is divided in G by the
factor the loss announced for this backward pass (``positnn.reduction``): the batch size N
for a positnn loss under the "positnn" reduction, times the policy's static loss scale;
1 for torch's losses or a custom one, whose gradient is already the true one. So ``.grad``
is always the gradient of the loss the user wrote, rounded to O. The G result is then
added into the parameter's O ``.grad``: set to O.round(g) when ``.grad`` is None
(returned through autograd, so ``torch.autograd.grad`` works), else updated in place as
``grad = O.add(grad, g)`` with one rounding. A parameter shared by several layers (tied
weights, tagged ``posit_shared`` by ``convert``) always takes the in-place path, so its
contributions are summed in O one rounding each, never in the float carrier.

Functional callers pass a :class:`~positnn.policy.LayerPolicy` (or any policy spec,
resolved for the root; None is float); modules also pass their cached F/B weight copies
and their NaR counters (``stats``). The ops live by family: ``linear`` (linear, conv2d),
``pooling``, ``activation``, ``normalization`` and ``loss``.
"""

from ._common import ops as ops
from ._common import resolve as resolve
from .activation import dropout as dropout
from .activation import flatten as flatten
from .activation import leaky_relu as leaky_relu
from .activation import relu as relu
from .activation import sigmoid as sigmoid
from .activation import tanh as tanh
from .linear import conv2d as conv2d
from .linear import linear as linear
from .loss import CE_TARGET_GRADS as CE_TARGET_GRADS
from .loss import cross_entropy as cross_entropy
from .loss import log_softmax as log_softmax
from .loss import mse_loss as mse_loss
from .normalization import batch_norm as batch_norm
from .pooling import avg_pool2d as avg_pool2d
from .pooling import max_pool2d as max_pool2d

__all__ = [
    "linear", "conv2d", "max_pool2d", "avg_pool2d", "relu", "leaky_relu", "sigmoid", "tanh",
    "dropout", "flatten", "batch_norm", "log_softmax", "cross_entropy", "CE_TARGET_GRADS", "mse_loss", "ops", "resolve",
]
