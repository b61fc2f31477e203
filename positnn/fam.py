"""PositNN's fused add-multiply (a + b) * c, as ``fam_corrected`` in its
``include/positnn/utils/utils.hpp`` computes it on Universal's ``value`` arithmetic.

PositNN's cross-entropy gradient for the target class is ``fam_corrected(e_t, -s, 1/s)``
(``CrossEntropyLoss.hpp``, ``derivative()``). Its steps, for posit(n, es) operands, with
``fbits = n - 3 - es`` (Universal's fraction width):

- the add (Universal's ``module_add<fbits, fbits + 4>``): both operands are aligned to the
  larger scale ``top`` on a grid of ``2**(top - fbits - 3)``: the larger-scale operand is
  exact there, the other keeps its bits above the grid's unit and ORs all bits from the
  unit down into that unit (a sticky bit); that is round-to-odd onto the grid. The sum of
  the two aligned values is exact. A zero operand beside a nonzero one enters as the value
  Universal decodes from the zero pattern, ``2**(-(n - 1) * 2**es)`` (its regime is a run
  of n - 1 zeros), so it only sets the sticky bit;
- the multiply: the sum times c, exact (``module_multiply``);
- one rounding of that product to the posit (``convert``), to nearest.

A zero sum or a zero ``c`` gives 0; a NaR operand gives NaR.
"""

from __future__ import annotations

import torch

from .format import Posit, TensorLike

# A binary Float (``Float.fam``) runs the same steps with its own fraction width and a zero
# operand that is zero: (fbits, zero_value) come from the format's ``_fam_params``.


def _round_to_odd(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """|x| * 2**shift rounded to an odd integer when it is not an integer (truncate to an
    even integer, then set the unit bit if anything was cut), with x's sign: the aligned
    operand of Universal's adder, in grid units."""
    m = torch.ldexp(x.abs(), shift)
    even = 2.0 * torch.floor(m / 2.0)
    return torch.copysign(torch.where(m == even, even, even + 1.0), x)


def fam(a: TensorLike, b: TensorLike, c: TensorLike, fmt: Posit, *, underflow: bool = False) -> torch.Tensor:
    """(a + b) * c for posit values of ``fmt``, as PositNN's ``fam_corrected``: the sum
    aligned with a sticky bit two places below the larger operand's last fraction bit
    (round-to-odd onto that grid, then an exact add), the product exact, one rounding to
    nearest (``underflow`` flushes as ``Posit.round`` does). Operands broadcast; the
    result has ``fmt.dtype``. Exactly (a + b) * c rounded once whenever a + b is exact on
    the grid, as it is for the target class of a cross entropy whose target is the argmax."""
    a, b, c = (torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, torch.Tensor) else t.double()
               for t in (a, b, c))
    a, b, c = torch.broadcast_tensors(a, b, c)
    fbits, zero_value = fmt._fam_params
    a1 = torch.where(a == 0, zero_value, a)
    b1 = torch.where(b == 0, zero_value, b)
    # floor(log2 |x|) of the larger operand; a zero (floats: zero_value 0) does not count.
    ea, eb = (torch.where(t == 0, -(1 << 20), torch.frexp(t).exponent.to(torch.int64)) for t in (a1, b1))
    top = torch.maximum(ea, eb) - 1
    shift = fbits + 3 - top  # grid unit 2**(top - fbits - 3)
    units = _round_to_odd(a1, shift) + _round_to_odd(b1, shift)
    total = torch.ldexp(units, -shift)
    out = fmt.mul(total, c, underflow=underflow)
    nar = a.isnan() | b.isnan() | c.isnan()
    zero = ((units == 0) | ((a == 0) & (b == 0)) | (c == 0)) & ~nar
    return torch.where(zero, torch.zeros((), dtype=out.dtype), out)
