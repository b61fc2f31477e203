"""One stage of one layer as a value: its format, quire mode, rounding and underflow, and
the operations computed in it.

``Stage.of(layer_policy, "forward")`` is how the engine asks for the numerics of an op: a
:class:`PositStage` rounds every result once to its posit format (dot products and sums
through one quire, element-wise arithmetic correctly rounded, transcendental functions
in float64 and rounded), and a :class:`NativeStage` is torch's own arithmetic, so a
float32 policy runs every op exactly as torch does. Callers never test for "float or
posit": they call the stage's methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as TF

from . import quire
from .format import Posit
from .policy import LayerPolicy

Dims = int | Sequence[int] | None


def _dims(x: torch.Tensor, dim: Dims) -> list[int]:
    if dim is None or (isinstance(dim, Sequence) and len(dim) == 0):
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(x.dim(), 1) for d in dims)


@dataclass(frozen=True)
class Stage:
    """The numerics of one stage; see :class:`PositStage` and :class:`NativeStage`."""

    @staticmethod
    def of(lp: LayerPolicy, name: str) -> "Stage":
        """The stage ``name`` ("forward", "backward", "gradient", "optimizer", "loss") of a
        resolved layer policy."""
        fmt = getattr(lp, name)
        if fmt is None:
            return NATIVE
        return PositStage(fmt, lp.quire, lp.rounding, lp.underflow)


@dataclass(frozen=True)
class NativeStage(Stage):
    """torch's own arithmetic in the tensors' dtype: the float32 baseline."""

    fmt: None = None

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add(self, a, b):
        return torch.add(a, b)

    def sub(self, a, b):
        return torch.sub(a, b)

    def mul(self, a, b):
        return torch.mul(a, b)

    def div(self, a, b):
        return torch.div(a, b)

    def fma(self, a, b, c):
        return a * b + c

    def sqrt(self, a):
        return torch.sqrt(a)

    def pointwise(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        return fn(*xs)

    def matmul(self, a, b, bias=None):
        y = torch.matmul(a, b)
        return y if bias is None else y + bias

    def sum(self, x: torch.Tensor, dim: Dims = None, keepdim: bool = False) -> torch.Tensor:
        return x.sum(_dims(x, dim), keepdim=keepdim) if x.dim() else x.clone()

    def conv2d(self, x, w, b, stride, padding, dilation, groups):
        return TF.conv2d(x, w, b, stride, padding, dilation, groups)

    def conv2d_input_grad(self, d, w, x_shape, stride, padding, dilation, groups):
        return torch.nn.grad.conv2d_input(tuple(x_shape), w, d, stride, padding, dilation, groups)

    def conv2d_weight_grad(self, x, d, w_shape, stride, padding, dilation, groups):
        return torch.nn.grad.conv2d_weight(x, tuple(w_shape), d, stride, padding, dilation, groups)


NATIVE = NativeStage()


@dataclass(frozen=True)
class PositStage(Stage):
    """Posit arithmetic in ``fmt``: every result rounded once (see the module docstring)."""

    fmt: Posit
    quire: str = "exact"
    rounding: str = "nearest"
    underflow: bool = False

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the format (every other method rounds its operands with this)."""
        return self.fmt.round(x, self.rounding, underflow=self.underflow)

    def _r(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        return self.round(x) if x.dtype.is_floating_point else x.double()  # masks, integer operands: exact

    def add(self, a, b):
        return self.fmt.add(self._r(a), self._r(b))

    def sub(self, a, b):
        return self.fmt.sub(self._r(a), self._r(b))

    def mul(self, a, b):
        return self.fmt.mul(self._r(a), self._r(b))

    def div(self, a, b):
        return self.fmt.div(self._r(a), self._r(b))

    def fma(self, a, b, c):
        return self.fmt.fma(self._r(a), self._r(b), self._r(c))

    def sqrt(self, a):
        return self.fmt.sqrt(self._r(a))

    def pointwise(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """A function with no exact posit algorithm (exp, GELU, their derivatives ...):
        evaluated in float64 on the rounded operands, then rounded once (faithful)."""
        args = [self._r(x).double() if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else x for x in xs]
        return self.round(fn(*args))

    def matmul(self, a, b, bias=None):
        """a @ b (+ bias (N,), inside the quire) with torch.matmul's broadcasting, one quire
        per output."""
        return quire.matmul(self._r(a), self._r(b), self.fmt, bias=None if bias is None else self._r(bias),
                            mode=self.quire, underflow=self.underflow)

    def sum(self, x: torch.Tensor, dim: Dims = None, keepdim: bool = False) -> torch.Tensor:
        """The sum over ``dim`` (all dims when None) in one quire per output."""
        x = self._r(x)
        if x.dim() == 0:
            return x.clone()
        dims = _dims(x, dim)
        rest = [d for d in range(x.dim()) if d not in dims]
        flat = x.permute(*rest, *dims).reshape(*[x.shape[d] for d in rest], math.prod(x.shape[d] for d in dims))
        out = quire.sum(flat, -1, self.fmt, mode=self.quire, underflow=self.underflow) if flat.dim() > 1 else \
            quire.sum(flat, 0, self.fmt, mode=self.quire, underflow=self.underflow)
        if keepdim:
            out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
        return out

    def conv2d(self, x, w, b, stride, padding, dilation, groups):
        return quire.conv2d(self._r(x), self._r(w), None if b is None else self._r(b), self.fmt, stride, padding,
                            dilation, groups, mode=self.quire, underflow=self.underflow)

    def conv2d_input_grad(self, d, w, x_shape, stride, padding, dilation, groups):
        return quire.conv2d_input_grad(self._r(d), self._r(w), x_shape, self.fmt, stride, padding, dilation, groups,
                                       mode=self.quire, underflow=self.underflow)

    def conv2d_weight_grad(self, x, d, w_shape, stride, padding, dilation, groups):
        return quire.conv2d_weight_grad(self._r(x), self._r(d), w_shape, self.fmt, stride, padding, dilation, groups,
                                        mode=self.quire, underflow=self.underflow)
