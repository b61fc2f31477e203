"""positnn: deep learning in simulated posit arithmetic, on PyTorch.

Layers, each importing only those before it: ``format`` (the Posit format: rounding, bit
patterns, correctly rounded ops, on the fused numba loops of ``kernels``) -> ``floatformat``
(the Float formats, fp8 to fp32, with the same interface) -> ``quire``
(exact dot products, matmul, conv) -> ``policy`` (the five stages) -> ``functional``
(autograd ops) -> ``nn``, ``optim``, ``convert`` -> ``data``, ``models``, ``train`` ->
``cli``. Nothing imports ``cli``.
"""

__version__ = "0.1.0"

from . import functional as functional  # noqa: E402
from . import nn as nn  # noqa: E402
from . import optim as optim  # noqa: E402
from . import quire as quire  # noqa: E402
from . import stats as stats  # noqa: E402
from .convert import convert as convert  # noqa: E402
from .floatformat import Float as Float  # noqa: E402
from .format import Posit as Posit  # noqa: E402
from .policy import LayerPolicy as LayerPolicy  # noqa: E402
from .policy import Policy as Policy  # noqa: E402

__all__ = ["Float", "LayerPolicy", "Policy", "Posit", "convert", "functional", "nn", "optim", "quire", "stats"]
