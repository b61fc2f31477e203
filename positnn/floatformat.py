"""Binary floating-point formats (fp8, fp16, bf16, fp32 and any eXmY): the ``Posit`` interface.

A ``Float`` is a frozen value like ``Posit``: constants, rounding (nearest-even and
stochastic), bit patterns and correctly rounded ``add``, ``sub``, ``mul``, ``div``, ``sqrt``
and ``fma``. Values live in float tensors of ``dtype``; the work is done by the numba loops
of ``kernels.float_rounding`` and ``kernels.float_arith``, compiled at first use.

Overflow, by preset: the IEEE-style formats (fp8e5m2, fp16, bf16, fp32) round to +-inf
exactly as IEEE 754 does (|x| >= max + ulp/2 becomes inf; so does torch's cast); fp8e4m3
(OCP E4M3FN: no infinities, S.1111.111 is the only NaN, max 448) saturates to +-448, and
+-inf also becomes +-448, which is what torch's cast to ``float8_e4m3fn`` does. The OCP
spec's other choice is ``overflow="nan"``: whatever rounds beyond max (|x| > 464 for E4M3)
becomes NaN, and so does inf. An IEEE format may also saturate (finite values only: an
infinity is a value of the format and stays).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import KW_ONLY, dataclass

import torch

from .backends import numba as numba_backend
from .format import TensorLike, _as_tensor, _check_float, _describe, _gen_device
from .kernels import float_arith as fa
from .kernels import float_rounding as fk

MIN_EXP_BITS, MAX_EXP_BITS = 2, 10  # <= 10: products and sums of values never leave float64
MIN_MAN_BITS, MAX_MAN_BITS = 1, 51  # <= 51: every midpoint is a float64 (the kernels' premise)
SPECIALS = ("ieee", "fn")
OVERFLOWS = {"ieee": ("inf", "saturate", "nan"), "fn": ("saturate", "nan")}
ROUNDING_MODES = ("nearest", "stochastic")
_TORCH_STORAGE = {  # torch dtypes with exactly these encodings (subnormals included)
    (4, 3, "fn"): torch.float8_e4m3fn,
    (5, 2, "ieee"): torch.float8_e5m2,
    (5, 10, "ieee"): torch.float16,
    (8, 7, "ieee"): torch.bfloat16,
    (8, 23, "ieee"): torch.float32,
}
_INT_STORAGE = ((8, torch.int8), (16, torch.int16), (32, torch.int32), (64, torch.int64))
_PARSE_RE = re.compile(r"^\s*(?:float\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)|e(\d+)m(\d+))\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Float:
    """The binary float format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    ``specials="ieee"``: the top exponent holds +-inf and NaNs; ``"fn"`` (OCP E4M3FN style):
    no infinities, only the all-ones magnitude is NaN, the top exponent holds normal
    values. ``overflow`` says what a finite value that rounds beyond ``max`` becomes:
    "inf" (IEEE; the default for "ieee"), "saturate" (+-max; the default for "fn") or
    "nan". ``subnormals=False`` keeps only 0 and the normals: round picks the nearest of
    them (|x| <= min_normal / 2 becomes 0), and decode reads subnormal patterns as 0.
    """

    exp_bits: int
    man_bits: int
    _: KW_ONLY
    subnormals: bool = True
    specials: str = "ieee"
    overflow: str | None = None

    def __post_init__(self) -> None:
        for name, value, lo, hi in (
            ("exp_bits", self.exp_bits, MIN_EXP_BITS, MAX_EXP_BITS),
            ("man_bits", self.man_bits, MIN_MAN_BITS, MAX_MAN_BITS),
        ):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"Float {name} must be an integer in [{lo}, {hi}], got {value!r}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.subnormals, bool):
            raise ValueError(f"Float subnormals must be True or False, got {self.subnormals!r}")
        if self.specials not in SPECIALS:
            raise ValueError(f"Float specials must be one of {SPECIALS}, got {self.specials!r}")
        allowed = OVERFLOWS[self.specials]
        if self.overflow is None:  # resolved here, so equal formats compare and hash equal
            object.__setattr__(self, "overflow", allowed[0])
        elif self.overflow not in allowed:
            raise ValueError(f"Float overflow with specials={self.specials!r} must be one of {allowed}, got {self.overflow!r}")

    def __repr__(self) -> str:
        extra = "" if self.subnormals else ", subnormals=False"
        extra += "" if self.specials == "ieee" else f", specials={self.specials!r}"
        extra += "" if self.overflow == OVERFLOWS[self.specials][0] else f", overflow={self.overflow!r}"
        return f"Float({self.exp_bits}, {self.man_bits}{extra})"

    def __str__(self) -> str:
        name = next((k for k, v in PRESETS.items() if v == self), None)
        if name is not None:
            return name
        inner = repr(self)[len("Float(") : -1].replace(" ", "").replace("'", "")
        return f"float({inner})"

    @classmethod
    def parse(cls, text: str) -> "Float":
        """A preset name ("fp8e4m3", "fp8e5m2", "fp16", "bf16", "fp32") or an IEEE-style
        format written "float(E,M)" or "eEmM" (e.g. "e5m10")."""
        if isinstance(text, str) and text.strip().lower() in PRESETS:
            return PRESETS[text.strip().lower()]
        m = _PARSE_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(
                f"cannot parse float format {text!r}: expected one of {sorted(PRESETS)}, 'float(E,M)' or 'eEmM' "
                f"with {MIN_EXP_BITS} <= E <= {MAX_EXP_BITS} and {MIN_MAN_BITS} <= M <= {MAX_MAN_BITS}"
            )
        g = m.groups()
        e, mb = (g[0], g[1]) if g[0] is not None else (g[2], g[3])
        return cls(int(e), int(mb))

    # -- constants ----------------------------------------------------------------------
    @property
    def nbits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal, 1 - bias."""
        return 1 - self.bias

    @property
    def has_infinities(self) -> bool:
        return self.specials == "ieee"

    @property
    def max(self) -> float:
        """The largest finite value."""
        if self.specials == "fn":  # top exponent, mantissa all ones but one (that is NaN)
            return (2.0 - 2.0 ** (1 - self.man_bits)) * 2.0 ** (self.bias + 1)
        return (2.0 - 2.0**-self.man_bits) * 2.0**self.bias

    @property
    def min_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.man_bits)

    @property
    def maxpos(self) -> float:
        """Alias of ``max``, for code written against ``Posit``."""
        return self.max

    @property
    def minpos(self) -> float:
        """The smallest positive value: min_subnormal, or min_normal without subnormals."""
        return self.min_subnormal if self.subnormals else self.min_normal

    @property
    def eps(self) -> float:
        """2 ** -man_bits: the spacing of the values just above 1."""
        return 2.0**-self.man_bits

    @property
    def max_significand_bits(self) -> int:
        return self.man_bits + 1

    @property
    def dtype(self) -> torch.dtype:
        """The float carrier: float32 if every value is a float32, else float64."""
        top = self.bias + (1 if self.specials == "fn" else 0)
        fits = self.man_bits <= 23 and top <= 127 and self.min_exponent - self.man_bits >= -149
        return torch.float32 if fits else torch.float64

    @property
    def storage_dtype(self) -> torch.dtype:
        """torch's own dtype where it has exactly these encodings (float8_e4m3fn,
        float8_e5m2, float16, bfloat16, float32), else the smallest signed integer type."""
        key = (self.exp_bits, self.man_bits, self.specials)
        if self.subnormals and key in _TORCH_STORAGE:
            return _TORCH_STORAGE[key]
        return next(dt for bits, dt in _INT_STORAGE if self.nbits <= bits)

    @property
    def _kernel_params(self) -> tuple:
        """(m, emin, max, finite overflow, infinity) as ``float_rounding`` takes them."""
        over = {"inf": float("inf"), "saturate": self.max, "nan": float("nan")}[self.overflow]
        infv = float("inf") if self.has_infinities else over
        return (self.man_bits, self.min_exponent, self.max, over, infv)

    def _accumulate_params(self, underflow: bool = False) -> tuple:
        """The format as the accumulation kernels take it (``kernels.accumulate.round_fmt``):
        kind 1, man_bits, min_exponent, max, overflow value, infinity value, flush."""
        m, emin, maxv, over, infv = self._kernel_params
        return (1, m, emin, maxv, over, infv, bool(underflow) or not self.subnormals)

    def includes(self, other: object) -> bool:
        """True when every value of ``other`` (a format) is a value of this float: a binary
        float with no more mantissa bits, no lower normal exponent, no larger max, and
        infinities only if this format has them (subnormals of ``other`` need subnormals
        here, unless they lie above this format's smallest normal)."""
        if not isinstance(other, Float):
            return False
        return (
            other.man_bits <= self.man_bits
            and other.min_exponent >= self.min_exponent
            and other.max <= self.max
            and (self.has_infinities or not other.has_infinities)
            and (self.subnormals or other.minpos >= self.min_normal)
        )

    def values(self) -> torch.Tensor:
        """Every value, indexed by the bit pattern read as unsigned (NaN patterns give NaN)."""
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
        """Round a floating tensor to the format, as a tensor of ``self.dtype``.

        "nearest" is IEEE round-to-nearest-even, then the format's overflow rule; signed
        zeros keep their sign and NaN stays NaN. "stochastic" picks the upper neighbour
        with probability linear in the distance, drawing from ``generator``. The
        ``underflow=True`` of ``Posit.round`` means here: round as if ``subnormals=False``.
        """
        x = _check_float(x, "x")
        flush = bool(underflow) or not self.subnormals
        if rounding == "nearest":
            return _launch(fk.round_nearest, self, (x,), flush, cast_inputs=False)
        if rounding == "stochastic":
            rand = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=_gen_device(generator))
            return _launch(fk.round_stochastic, self, (x, rand), flush, cast_inputs=False)
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")

    def encode(self, x: torch.Tensor, *, round: bool = False) -> torch.Tensor:
        """Bit patterns as ``storage_dtype`` (integer patterns are sign-extended); NaN
        becomes the positive quiet NaN. Raises ValueError if an element is not exactly a
        value of the format, unless ``round=True``, which rounds to nearest first."""
        x = _check_float(x, "x")
        if round:
            x = self.round(x)
        width = next(dt for bits, dt in _INT_STORAGE if self.nbits <= bits)
        out = torch.empty(x.shape, dtype=width)
        args = (self.man_bits, self.min_exponent, self.max, self.specials == "fn", self.subnormals, self.nbits)
        bad = fk.encode(numba_backend._host_flat(x), out.view(-1).numpy(), *args)
        if bad:
            flat = x.detach().reshape(-1).cpu().double()
            wrong = ~((self.round(flat).double() == flat) | flat.isnan())
            idx = int(wrong.nonzero()[0, 0])
            raise ValueError(
                f"{bad} element(s) are not {self} values, e.g. {flat[idx].item()!r} at flat index {idx}; "
                f"use encode(x, round=True) or encode(fmt.round(x))"
            )
        return out.view(self.storage_dtype).to(x.device)

    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Values of bit patterns, as ``self.dtype``: an integer tensor (its low ``nbits``
        bits) or a tensor of ``storage_dtype`` (e.g. torch.float8_e4m3fn)."""
        if isinstance(bits, torch.Tensor) and bits.dtype.is_floating_point and bits.dtype == self.storage_dtype:
            bits = bits.view(next(dt for b, dt in _INT_STORAGE if b == bits.element_size() * 8))
        if not isinstance(bits, torch.Tensor) or bits.dtype.is_floating_point or bits.dtype.is_complex or bits.dtype == torch.bool:
            raise TypeError(f"decode expects an integer tensor of bit patterns or {self.storage_dtype}, got {_describe(bits)}")
        out = torch.empty(bits.shape, dtype=self.dtype)
        args = (self.man_bits, self.min_exponent, self.specials == "fn", self.subnormals, self.nbits)
        fk.decode(numba_backend._host_flat(bits), out.view(-1).numpy(), *args)
        return out.to(bits.device)

    def _flush(self, underflow: bool) -> bool:
        # ``underflow=True`` flushes as a format without subnormals does, as in ``round``.
        return bool(underflow) or not self.subnormals

    # -- correctly rounded arithmetic (IEEE semantics: x/0 = +-inf, inf - inf = NaN) --------
    def add(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a + b, computed exactly and rounded once."""
        return _launch(fa.add, self, (a, b), self._flush(underflow))

    def sub(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a - b, computed exactly and rounded once."""
        return _launch(fa.add, self, (a, -_as_tensor(b)), self._flush(underflow))

    def mul(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a * b, computed exactly and rounded once."""
        return _launch(fa.mul, self, (a, b), self._flush(underflow))

    def div(self, a: TensorLike, b: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a / b, correctly rounded; x / 0 is an infinity (then the format's rule for it)."""
        return _launch(fa.div, self, (a, b), self._flush(underflow))

    def sqrt(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """Square root, correctly rounded; negative inputs give NaN, sqrt(-0) = -0."""
        return _launch(fa.sqrt, self, (a,), self._flush(underflow))

    def fma(self, a: TensorLike, b: TensorLike, c: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """a * b + c with a single rounding."""
        return _launch(fa.fused_multiply_add, self, (a, b, c), self._flush(underflow))

    def fam(self, a: TensorLike, b: TensorLike, c: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """(a + b) * c by the steps of PositNN's ``fam_corrected`` (``positnn.fam``) with this
        format's fraction width: the sum aligned with a sticky bit two places below the
        larger operand's last mantissa bit, the product exact, one rounding. Exactly
        (a + b) * c rounded once whenever a + b is exact on that grid."""
        from .fam import fam

        return fam(a, b, c, self, underflow=underflow)

    @property
    def _fam_params(self) -> tuple[int, float]:
        """(fraction bits, value of a zero operand) of ``positnn.fam``."""
        return self.man_bits, 0.0

    def neg(self, a: TensorLike) -> torch.Tensor:
        """-a (exact for format values; other inputs are rounded)."""
        return self.round(-_as_tensor(a))

    def abs(self, a: TensorLike) -> torch.Tensor:
        """|a| (exact for format values; other inputs are rounded)."""
        return self.round(_as_tensor(a).abs())

    # Faithful, not correctly rounded: evaluated in float64, then rounded once (as Posit's).
    def exp(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """exp(a) evaluated in float64, then rounded: faithful, not correctly rounded."""
        return self.round(torch.exp(_as_tensor(a).double()), underflow=underflow)

    def log(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """log(a) evaluated in float64, then rounded (log(0) = -inf, log(-1) = NaN): faithful."""
        return self.round(torch.log(_as_tensor(a).double()), underflow=underflow)

    def sigmoid(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """sigmoid(a) evaluated in float64, then rounded: faithful."""
        return self.round(torch.sigmoid(_as_tensor(a).double()), underflow=underflow)

    def tanh(self, a: TensorLike, *, underflow: bool = False) -> torch.Tensor:
        """tanh(a) evaluated in float64, then rounded: faithful."""
        return self.round(torch.tanh(_as_tensor(a).double()), underflow=underflow)


PRESETS: dict[str, Float] = {
    "fp8e4m3": Float(4, 3, specials="fn"),
    "fp8e5m2": Float(5, 2),
    "fp16": Float(5, 10),
    "bf16": Float(8, 7),
    "fp32": Float(8, 23),
}


def _launch(kernel, fmt: Float, operands, flag: bool, *, cast_inputs: bool = True) -> torch.Tensor:
    """A Float kernel over the broadcast operands (numbers become float64 scalars)."""
    tensors = tuple(_as_tensor(t) if cast_inputs else t for t in operands)
    return numba_backend.launch(kernel, fmt, tensors, flag, float64=cast_inputs)
