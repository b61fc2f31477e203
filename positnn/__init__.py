"""positnn: deep learning in simulated posit arithmetic, on PyTorch.

Layers, each importing only those above it in this list: ``format`` (the Posit format:
rounding, bit patterns, correctly rounded ops) -> ``kernels`` (fused numba loops) ->
``quire`` (exact dot products, matmul, conv) -> ``functional`` (autograd ops) ->
``nn``, ``optim`` and ``policy`` -> ``cli``.
"""

from .format import Posit as Posit

__all__ = ["Posit"]
__version__ = "0.1.0"
