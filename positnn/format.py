"""The posit(n, es) format: constants, rounding, bit patterns and correctly rounded ops.

Posit values live in ordinary float tensors (the format's ``dtype``: float32 when every
value is an exact float32, float64 otherwise), so every torch op, autograd and DataLoader
can carry them; NaR is held as NaN. Bit patterns (``storage_dtype``) are for storage.
The loops run in the backend of the tensors' device (``positnn.backends``: the numba
kernels of ``positnn.kernels`` on the CPU, compiled at first use).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import backends
from .backends import backend_for

MIN_NBITS, MAX_NBITS = 2, 32
MIN_ES, MAX_ES = 0, 5
ROUNDING_MODES = ("nearest", "stochastic")
# One alternative per bracket pair, so that "posit<8,2)" is refused.
_PARSE_RE = re.compile(
    r"^\s*(?:posit\s*(?:\(\s*(\d+)\s*,\s*(\d+)\s*\)|<\s*(\d+)\s*,\s*(\d+)\s*>)"
    r"|p(?:osit)?(\d+)(?:e|_|es)(\d+)|posit(\d+))\s*$",
    re.IGNORECASE,
)
PARSE_FORMS = ("posit(N,ES)", "posit<N,ES>", "pNeES", "positN_ES", "positN (ES = 2)")

TensorLike = torch.Tensor | float | int


@dataclass(frozen=True)
class Posit:
    """The posit format posit(nbits, es): 2 <= nbits <= 32, 0 <= es <= 5.

    An immutable value object (hashable, comparable) that knows its constants and rounds,
    encodes, decodes and computes on tensors of posit values. Methods accept tensors on any
    device; the backend is chosen by the device (a device without one of its own uses the
    numba backend, round-tripping through host memory).
    """

    nbits: int
    es: int

    def __post_init__(self) -> None:
        for name, lo, hi in (("nbits", MIN_NBITS, MAX_NBITS), ("es", MIN_ES, MAX_ES)):
            value = getattr(self, name)
            try:  # any integral number (numpy and torch integers too), but not a bool or 8.0
                number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
            except TypeError:
                number = None
            if number is None or not lo <= number <= hi:
                raise ValueError(f"posit {name} must be an integer in [{lo}, {hi}], got {value!r}")
            # A plain int, so that hashing and equality agree with Posit(8, 2).
            object.__setattr__(self, name, int(number))

    def __repr__(self) -> str:
        return f"Posit({self.nbits}, {self.es})"

    def __str__(self) -> str:
        return f"posit({self.nbits},{self.es})"

    @classmethod
    def parse(cls, text: str) -> "Posit":
        """Parse "posit(8,2)", "posit<8,2>", "p8e2", "posit8_2" or "posit8" (es = 2, as in
        the 2022 standard and the PositNN recipe names)."""
        m = _PARSE_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(
                f"cannot parse posit format {text!r}: expected one of {', '.join(PARSE_FORMS)} "
                f"with {MIN_NBITS} <= N <= {MAX_NBITS} and {MIN_ES} <= ES <= {MAX_ES}"
            )
        g = m.groups()
        if g[6] is not None:
            return cls(int(g[6]), 2)
        nbits, es = next((g[i], g[i + 1]) for i in (0, 2, 4) if g[i] is not None)
        return cls(int(nbits), int(es))

    # -- constants ----------------------------------------------------------------------
    @property
    def useed(self) -> int:
        """2 ** 2 ** es: the factor between consecutive regimes."""
        return 1 << (1 << self.es)

    @property
    def max_exponent(self) -> int:
        """log2(maxpos) = (nbits - 2) * 2**es; minpos is 2 ** -max_exponent."""
        return (self.nbits - 2) << self.es

    @property
    def maxpos(self) -> float:
        return 2.0**self.max_exponent

    @property
    def minpos(self) -> float:
        return 2.0**-self.max_exponent

    @property
    def max_significand_bits(self) -> int:
        """Significand bits (hidden bit included) of the most precise values, near 1."""
        return max(self.nbits - 2 - self.es, 1)

    @property
    def dtype(self) -> torch.dtype:
        """The float carrier: float32 if every value is a normal float32, else float64."""
        fits = self.max_exponent <= 126 and self.max_significand_bits <= 24
        return torch.float32 if fits else torch.float64

    @property
    def storage_dtype(self) -> torch.dtype:
        """The smallest signed integer type that holds a bit pattern."""
        return torch.int8 if self.nbits <= 8 else torch.int16 if self.nbits <= 16 else torch.int32

    @property
    def _kernel_params(self) -> tuple:
        """The format as the kernels take it (``_launch`` is shared with ``Float``)."""
        return (self.nbits, self.es)

    def _accumulate_params(self, underflow: bool = False) -> tuple:
        """The format as the accumulation kernels take it (``kernels.accumulate.round_fmt``):
        kind 0, n, es, three unused floats, underflow."""
        return (0, self.nbits, self.es, 0.0, 0.0, 0.0, bool(underflow))

    def includes(self, other: object) -> bool:
        """True when every value of ``other`` (a format) is a value of this posit: the same
        es with at most as many bits (a posit(n, es) pattern followed by zeros is the same
        posit(m, es) value). No binary float qualifies (posits have no infinities)."""
        return isinstance(other, Posit) and other.es == self.es and other.nbits <= self.nbits

    @property
    def quire_bits(self) -> int:
        """Quire width: 16n (Posit Standard 2022) for es = 2, else Universal's
        2**es * (4n - 8) product range plus 30 carry bits and a sign bit."""
        if self.es == 2:
            return 16 * self.nbits
        return (1 << self.es) * (4 * self.nbits - 8) + 31

    def values(self) -> torch.Tensor:
        """Every value, indexed by the bit pattern read as unsigned (NaR is NaN)."""
        if self.nbits > 16:
            raise ValueError(f"values() enumerates formats of at most 16 bits, not {self.nbits}")
        return self.decode(torch.arange(1 << self.nbits, dtype=torch.int64))

    # -- rounding and bit patterns ---------------------------------------------------------
    def round(
        self,
        x: torch.Tensor,
        rounding: str = "nearest",
        *,
        underflow: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Round a floating tensor to the nearest posits, as a tensor of ``self.dtype``.

        "nearest" is round-to-nearest-even on the bit string (geometric midpoints where
        exponent bits are cut), saturating at minpos and maxpos; NaN and +-inf become NaR.
        "stochastic" picks the upper neighbour with probability linear in the distance,
        drawing from ``generator``. ``underflow=True`` flushes |x| <= minpos / useed to 0
        (PositNN's non-standard option).

        The result is detached: rounding has no autograd rule, so gradients do not flow
        through it (``positnn.functional`` defines the ops' backward passes).
        """
        check_rounding_options(rounding, underflow)
        x = _check_float(x, "x")
        if rounding == "nearest":
            return backend_for(x.device).round_nearest(x, self, underflow)
        rand = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator, x.device))
        return backend_for(x.device).round_stochastic(x, rand, self, underflow)

    def encode(self, x: torch.Tensor, *, round: bool = False) -> torch.Tensor:
        """Two's-complement bit patterns (``storage_dtype``) of posit values; NaR is 100...0.

        Raises ValueError if an element is not exactly a posit of this format, unless
        ``round=True``, which rounds to nearest first.
        """
        x = _check_float(x, "x")
        if round:
            x = self.round(x)
        out, bad = backend_for(x.device).encode(x, self)
        if bad:
            flat = x.detach().reshape(-1).cpu().double()
            wrong = (self.round(flat).double() != flat) & ~flat.isnan()
            idx = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"{bad} element(s) are not {self} values, e.g. {flat[idx].item()!r} at flat index {idx}; "
                f"use encode(x, round=True) or encode(fmt.round(x))"
            )
        return out

    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Values of bit patterns (the low ``nbits`` bits of each integer), as ``self.dtype``."""
        if not isinstance(bits, torch.Tensor) or bits.dtype.is_floating_point or bits.dtype.is_complex or bits.dtype == torch.bool:
            raise TypeError(f"decode expects an integer tensor of bit patterns, got {_describe(bits)}")
        return backend_for(bits.device).decode(bits, self)

    # -- correctly rounded arithmetic -------------------------------------------------------
    # ``underflow=True`` flushes a result of magnitude <= minpos / useed to 0, as ``round``
    # does: PositNN's option applies to every rounding, arithmetic results included.
    def add(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a + b, computed exactly and rounded once."""
        return self._arith("add", underflow, a, b)

    def sub(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a - b, computed exactly and rounded once."""
        return self._arith("add", underflow, a, -_as_tensor(b))

    def mul(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a * b, computed exactly and rounded once."""
        return self._arith("mul", underflow, a, b)

    def div(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a / b, correctly rounded; division by zero gives NaR."""
        return self._arith("div", underflow, a, b)

    def sqrt(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """Square root, correctly rounded; negative inputs give NaR."""
        return self._arith("sqrt", underflow, a)

    def fma(self, a: TensorLike, b: TensorLike, c: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a * b + c with a single rounding."""
        return self._arith("fma", underflow, a, b, c)

    def fam(self, a: TensorLike, b: TensorLike, c: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """(a + b) * c as PositNN's ``fam_corrected``: the sum aligned with a sticky bit,
        the product exact, one rounding (see :mod:`positnn.fam`)."""
        from .fam import fam  # positnn.fam builds on this class

        return fam(a, b, c, self, underflow=underflow)

    @property
    def _fam_params(self) -> tuple[int, float]:
        """(fraction bits, value of a zero operand) of ``positnn.fam``: Universal's
        fbits = n - 3 - es, and the scale it decodes from the zero pattern."""
        return max(self.nbits - 3 - self.es, 0), 2.0 ** (-(self.nbits - 1) * (1 << self.es))

    def neg(self, a: TensorLike) -> torch.Tensor:
        """-a (exact for posit inputs; other inputs are rounded)."""
        return self.round(-_as_tensor(a))

    def abs(self, a: TensorLike) -> torch.Tensor:
        """|a| (exact for posit inputs; other inputs are rounded)."""
        return self.round(_as_tensor(a).abs())

    # Faithful, not correctly rounded: evaluated in float64, then rounded once (as PositNN).
    def exp(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """exp(a) evaluated in float64, then rounded: faithful, not correctly rounded."""
        return self._via_float64(_positive(torch.exp), a, underflow)

    def log(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """log(a) evaluated in float64, then rounded (log(0) is NaR): faithful."""
        return self._via_float64(lambda t: torch.where(t == 0, torch.nan, torch.log(t)), a, underflow)

    def sigmoid(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """sigmoid(a) evaluated in float64, then rounded: faithful."""
        return self._via_float64(_positive(torch.sigmoid), a, underflow)

    def tanh(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """tanh(a) evaluated in float64, then rounded: faithful."""
        return self._via_float64(torch.tanh, a, underflow)

    def _via_float64(self, fn: Callable[[torch.Tensor], torch.Tensor], a: TensorLike,
                     underflow: bool = False) -> torch.Tensor:
        return self.round(fn(_as_tensor(a).double()), underflow=underflow)

    def _arith(self, op: str, underflow: bool, *operands: TensorLike) -> torch.Tensor:
        """Backend op ``op`` on the broadcast operands, the result on the device of the
        first operand that is not a scalar (Python numbers become float64 scalars). The
        underflow flag reaches a backend only when set, and only one that declares
        ``ARITH_UNDERFLOW`` (others keep their signature; numba runs those ops)."""
        check_rounding_options("nearest", underflow)
        tensors = [_as_tensor(t) for t in operands]
        device = next((t.device for t in tensors if t.dim() > 0), tensors[0].device)
        if len(tensors) > 1:
            tensors = torch.broadcast_tensors(*tensors)
        backend, flags = backend_for(device), {}
        if underflow:
            flags["underflow"] = True
            if not getattr(backend, "ARITH_UNDERFLOW", False):  # e.g. Triton's: numba's takes it, via the host
                backend = backends.get("numba")
        return getattr(backend, op)(*tensors, self, device, **flags)


def check_rounding_options(rounding: str = "nearest", underflow: bool = False) -> None:
    """Raise ValueError unless ``rounding`` is one of ROUNDING_MODES and ``underflow`` a bool
    (a string such as "yes" would otherwise be truthy, or reach a kernel untyped)."""
    if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if not isinstance(underflow, (bool, np.bool_)):
        raise ValueError(f"underflow must be a bool (True or False), got {underflow!r}")


def _positive(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn for a function that is positive on every real: a float64 underflow to 0 becomes
    the smallest subnormal, so the posit result is minpos, never 0; +-inf inputs are NaR."""
    def f(t: torch.Tensor) -> torch.Tensor:
        y = fn(t).clamp_min(5e-324)
        return torch.where(torch.isinf(t), torch.nan, y)

    return f


def _describe(x: object) -> str:
    return f"tensor of dtype {x.dtype}" if isinstance(x, torch.Tensor) else f"{type(x).__name__}"


def _check_float(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {_describe(x)}"
        )
    return x


def _as_tensor(x: TensorLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return _check_float(x, "operand")
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    raise TypeError(f"operands must be floating-point tensors or Python numbers, got {_describe(x)}")


def _gen_device(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    """Where the uniforms are drawn: on the generator's device, else on ``default`` (the
    tensor's device for posits, so a CUDA tensor draws from CUDA's Philox generator)."""
    return generator.device if generator is not None else torch.device(default)
