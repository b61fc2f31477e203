"""One stage of one layer as a value: its format, quire mode, rounding and underflow, and
the operations computed in it.

``Stage.of(layer_policy, "forward")`` is how the engine asks for the numerics of an op: a
:class:`PositStage` rounds every result once to its format (a posit or a binary float) (dot products and sums
through one quire, element-wise arithmetic correctly rounded, transcendental functions
in float64 and rounded), and a :class:`NativeStage` is torch's own arithmetic, so a
float32 policy runs every op exactly as torch does. Callers never test for "float or
posit": they call the stage's methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as TF

from . import quire
from .floatformat import Float
from .format import Posit
from .policy import LayerPolicy
from .rounding import is_subformat, round_scalar, scaled_round

Dims = int | Sequence[int] | None


def _dims(x: torch.Tensor, dim: Dims) -> list[int]:
    if dim is None or (isinstance(dim, Sequence) and len(dim) == 0):
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(x.dim(), 1) for d in dims)


# A result a stage rounded to nearest carries (format, underflow, version): using it as an
# operand of that stage again costs no second rounding pass, and an in-place write (which
# bumps the version counter a view or a detached copy shares) voids the mark.
_MARK = "_positnn_rounded"


def _mark_key(x: torch.Tensor):
    owner = x if x._base is None else x._base
    mark = getattr(owner, _MARK, None)
    if mark is None or x.is_inference():
        return None
    key, version = mark
    return key if version == x._version else None


def carry_mark(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Give ``dst`` (a detached alias or a copy of ``src``) ``src``'s rounding mark."""
    key = _mark_key(src)
    if key is not None and not dst.is_inference():
        setattr(dst, _MARK, (key, dst._version))
    return dst


@dataclass(frozen=True)
class Stage:
    """The numerics of one stage; see :class:`PositStage` and :class:`NativeStage`."""

    # True for torch's own arithmetic: autograd's float accumulation is then this stage's add.
    native: ClassVar[bool]

    @staticmethod
    def of(lp: LayerPolicy, name: str, *, round_operands: bool = True) -> "Stage":
        """The stage ``name`` ("forward", "backward", "gradient", "optimizer", "loss") of a
        resolved layer policy. With ``round_operands=False`` a posit stage takes its
        operands as they are, for callers that keep them in their stages themselves (the
        autograd ops of ``positnn.functional``): each op is then the exact result of its
        operands rounded once, and ``O.sub(f_value, o_value)`` does not round the F value
        to O first."""
        fmt = getattr(lp, name)
        if fmt is None:
            return NATIVE
        return PositStage(fmt, lp.quire, lp.rounding, lp.underflow, round_operands, lp.scaling)

    def contains(self, other: "Stage") -> bool:
        """True when every value of ``other`` is a value of this stage, so rounding one to
        this stage is exact and may be skipped."""
        return is_subformat(other.fmt, self.fmt)


@dataclass(frozen=True)
class NativeStage(Stage):
    """torch's own arithmetic in the tensors' dtype: the float32 baseline."""

    fmt: None = None
    native: ClassVar[bool] = True

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def constant(self, value: float) -> float:
        return float(value)

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

    def fam(self, a, b, c):
        return (a + b) * c

    def sqrt(self, a):
        return torch.sqrt(a)

    def exp(self, a):
        return torch.exp(a)

    def log(self, a):
        return torch.log(a)

    def sigmoid(self, a):
        return torch.sigmoid(a)

    def tanh(self, a):
        return torch.tanh(a)

    def pointwise(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        return fn(*xs)

    def matmul(self, a, b, bias=None):
        y = torch.matmul(a, b)
        return y if bias is None else y + bias

    def linear(self, x, w, b=None):
        return TF.linear(x, w, b)

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
    """Arithmetic in ``fmt``, a posit or a binary float (the same code: the format is a
    value): every result rounded once (see the module docstring). With ``scaling``
    "tensorwise", the operands of dot products that this stage rounds are rounded under a
    per-tensor power-of-two scale (``positnn.rounding.scaled_round``)."""

    fmt: Posit | Float
    quire: str = "exact"
    rounding: str = "nearest"
    underflow: bool = False
    round_operands: bool = True
    scaling: str = "none"
    native: ClassVar[bool] = False

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to the format (every other method rounds its operands with this,
        unless ``round_operands`` is False); ``x`` itself when this stage produced it."""
        key = self._key()
        if key is not None and isinstance(x, torch.Tensor) and _mark_key(x) == key:
            return x
        return self._done(self.fmt.round(x, self.rounding, underflow=self.underflow))

    def _key(self):
        return (self.fmt, self.underflow) if self.rounding == "nearest" else None

    def _done(self, y):
        """Mark a result of this stage as one of its values (see ``_MARK``)."""
        key = self._key()
        if key is not None and isinstance(y, torch.Tensor) and not y.is_inference():
            setattr(y, _MARK, (key, y._version))
        return y

    def constant(self, value: float) -> float:
        """A constant (a slope, a scale) as a value of the format: rounded to nearest
        whatever the stage's rounding, since it is the same number at every step."""
        return round_scalar(value, self.fmt)

    def _r(self, x):
        if not isinstance(x, torch.Tensor) or not self.round_operands:
            return x
        return self.round(x) if x.dtype.is_floating_point else x.double()  # masks, integer operands: exact

    def _op(self, x):
        """A dot-product operand: as ``_r``, under the per-tensor scale when scaling."""
        if self.scaling == "none" or not isinstance(x, torch.Tensor) or not self.round_operands \
                or not x.dtype.is_floating_point:
            return self._r(x)
        return scaled_round(x, self.fmt, self.rounding, underflow=self.underflow)

    # Every result honours the stage's underflow flush, as PositNN's every rounding does.
    def add(self, a, b):
        return self._done(self.fmt.add(self._r(a), self._r(b), underflow=self.underflow))

    def sub(self, a, b):
        return self._done(self.fmt.sub(self._r(a), self._r(b), underflow=self.underflow))

    def mul(self, a, b):
        return self._done(self.fmt.mul(self._r(a), self._r(b), underflow=self.underflow))

    def div(self, a, b):
        return self._done(self.fmt.div(self._r(a), self._r(b), underflow=self.underflow))

    def fma(self, a, b, c):
        return self._done(self.fmt.fma(self._r(a), self._r(b), self._r(c), underflow=self.underflow))

    def fam(self, a, b, c):
        """(a + b) * c as PositNN's fused add-multiply (``Posit.fam``)."""
        return self._done(self.fmt.fam(self._r(a), self._r(b), self._r(c), underflow=self.underflow))

    def sqrt(self, a):
        return self._done(self.fmt.sqrt(self._r(a), underflow=self.underflow))

    # Faithful: evaluated in float64, rounded once to nearest (Posit.exp ...).
    def exp(self, a):
        return self._done(self.fmt.exp(self._r(a), underflow=self.underflow))

    def log(self, a):
        return self._done(self.fmt.log(self._r(a), underflow=self.underflow))

    def sigmoid(self, a):
        return self._done(self.fmt.sigmoid(self._r(a), underflow=self.underflow))

    def tanh(self, a):
        return self._done(self.fmt.tanh(self._r(a), underflow=self.underflow))

    def pointwise(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """A function with no exact posit algorithm (exp, GELU, their derivatives ...):
        evaluated in float64 on the rounded operands, then rounded once (faithful)."""
        args = [self._r(x).double() if isinstance(x, torch.Tensor) and x.dtype.is_floating_point else x for x in xs]
        return self.round(fn(*args))

    def matmul(self, a, b, bias=None):
        """a @ b (+ bias (N,), inside the quire) with torch.matmul's broadcasting, one quire
        per output."""
        return self._done(quire.matmul(self._op(a), self._op(b), self.fmt, bias=None if bias is None else self._r(bias),
                            mode=self.quire, underflow=self.underflow))

    def linear(self, x, w, b=None):
        """x @ w.T + b as ``torch.nn.functional.linear``, one quire per output."""
        return self._done(quire.linear(self._op(x), self._op(w), None if b is None else self._r(b), self.fmt,
                            mode=self.quire, underflow=self.underflow))

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
        return self._done(out)

    def conv2d(self, x, w, b, stride, padding, dilation, groups):
        return self._done(quire.conv2d(self._op(x), self._op(w), None if b is None else self._r(b), self.fmt, stride, padding,
                            dilation, groups, mode=self.quire, underflow=self.underflow))

    def conv2d_input_grad(self, d, w, x_shape, stride, padding, dilation, groups):
        return self._done(quire.conv2d_input_grad(self._op(d), self._op(w), x_shape, self.fmt, stride, padding, dilation, groups,
                                       mode=self.quire, underflow=self.underflow))

    def conv2d_weight_grad(self, x, d, w_shape, stride, padding, dilation, groups):
        return self._done(quire.conv2d_weight_grad(self._op(x), self._op(d), w_shape, self.fmt, stride, padding, dilation, groups,
                                        mode=self.quire, underflow=self.underflow))
