"""positnn: deep learning in simulated posit arithmetic, on PyTorch.

Layers, each importing only those before it: ``kernels`` (the numba loops) ->
``backends`` (who runs the element-wise loops and the quire's kernels of a device; numba on
the CPU, Triton on CUDA) -> ``format``
(the Posit format: rounding, bit patterns, correctly rounded ops) and ``floatformat`` (the
Float formats, fp8 to fp32, with the same interface) -> ``quire`` (exact dot
products, matmul, conv), ``rounding`` (bare-format helpers), ``stats`` (NaR counters) and
``reduction`` (the gradient scale a loss announces) -> ``policy`` (the five stages, per
layer) -> ``stage`` (one stage's numerics as a value) -> ``distributed`` (batch reductions
summed over processes as quire limbs) -> ``functional`` (the autograd ops of the paper's layers) -> ``nn`` -> ``engine`` (any model, op by op) -> ``optim``, ``convert``
-> ``data``, ``models``, ``report``, ``train``, ``reproduce`` -> ``cli``. Nothing imports
``cli``.
"""

__version__ = "0.1.0"

from . import backends as backends  # noqa: E402
from . import distributed as distributed  # noqa: E402
from . import functional as functional  # noqa: E402
from . import nn as nn  # noqa: E402
from . import optim as optim  # noqa: E402
from . import quire as quire  # noqa: E402
from . import stats as stats  # noqa: E402
from .backends import backend as backend  # noqa: E402
from .convert import convert as convert  # noqa: E402
from .floatformat import Float as Float  # noqa: E402
from .format import Posit as Posit  # noqa: E402
from .policy import LayerPolicy as LayerPolicy  # noqa: E402
from .policy import Policy as Policy  # noqa: E402

__all__ = ["Float", "LayerPolicy", "Policy", "Posit", "backend", "backends", "convert", "distributed", "functional", "nn", "optim", "quire", "stats"]
