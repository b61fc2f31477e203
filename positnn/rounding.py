"""Stage conversions on bare formats: round or pass through, constants, subformats.

A format here is a :class:`~positnn.format.Posit` or ``None`` (plain float). These are the
numeric helpers below :mod:`positnn.stage`, kept apart from the configuration in
:mod:`positnn.policy` (which re-exports them for one release).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch

from .floatformat import Float
from .format import Posit

if TYPE_CHECKING:
    from .policy import LayerPolicy, Policy

Format = Posit | Float | None


def maybe_round(
    x: torch.Tensor,
    fmt: Format,
    policy: LayerPolicy | Policy | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` to ``fmt`` with the policy's rounding and underflow options, or return it
    unchanged when the stage is float (``fmt is None``): for callers holding a bare format
    (modules' master copies, checkpoints); the autograd ops round through
    :meth:`positnn.stage.Stage.round`, which rounds the same way."""
    if fmt is None:
        return x
    if policy is None:
        return fmt.round(x)
    return fmt.round(x, policy.rounding, underflow=policy.underflow, generator=generator)


@functools.lru_cache(maxsize=4096)
def round_scalar(value: float, fmt: Format) -> float:
    """A constant (a slope, a dropout scale, a learning rate) as a unit of ``fmt`` holds
    it: rounded to nearest, or unchanged for a float stage. Cached, since these recur every
    step and a kernel launch per constant would cost more than a small layer's update."""
    if fmt is None:
        return float(value)
    return float(fmt.round(torch.tensor(float(value), dtype=torch.float64)))


def is_subformat(inner: Format, outer: Format) -> bool:
    """True when every value of ``inner`` is a value of ``outer`` (so rounding an inner
    value to outer is exact): the same format, outer float, or the same es with at least
    as many bits (a posit(n, es) pattern followed by zeros is the same posit(m, es) value),
    or a binary float inside a wider one (``Float.includes``). Float inner values fit only
    a float outer."""
    if outer is None or inner == outer:
        return True
    if inner is None:
        return False
    return outer.includes(inner)


def scale_exponent(x: torch.Tensor, fmt: Posit | Float) -> int:
    """k such that amax(|x|) * 2**k <= fmt.maxpos < amax(|x|) * 2**(k + 1): torchao's
    tensorwise amax scale max / amax, rounded down to a power of two; 0 when x is empty,
    all zero or holds a NaN or an infinity (nothing to scale by)."""
    amax = float(x.detach().abs().amax()) if x.numel() else 0.0
    if not (amax > 0 and math.isfinite(amax)):
        return 0
    k = math.floor(math.log2(fmt.maxpos) - math.log2(amax))
    while math.ldexp(amax, k + 1) <= fmt.maxpos:  # log2 is inexact: settle k exactly
        k += 1
    while math.ldexp(amax, k) > fmt.maxpos:
        k -= 1
    return k


def scaled_round(
    x: torch.Tensor,
    fmt: Format,
    rounding: str = "nearest",
    *,
    underflow: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x rounded to ``fmt`` under a per-tensor power-of-two scale: round(x * 2**k) * 2**-k
    with k = ``scale_exponent(x, fmt)``, in x's dtype (float64 for other inputs). Both
    scalings are exact, so the result is a format value times 2**-k: the largest element
    lands in the format's top binade, and small ones keep the format's relative precision
    instead of underflowing. A float stage (None) returns x."""
    if fmt is None:
        return x
    k = scale_exponent(x, fmt)
    if k == 0:
        return fmt.round(x, rounding, underflow=underflow, generator=generator)
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float64
    scaled = fmt.round(x.double() * 2.0**k, rounding, underflow=underflow, generator=generator)
    return (scaled.double() * 2.0**-k).to(dt)
