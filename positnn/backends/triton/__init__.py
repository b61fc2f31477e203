"""The Triton backend: posit kernels that run where the tensors are (CUDA or ROCm GPUs).

It serves CUDA tensors by default (``positnn.backends`` registers it for the "cuda" device
type), and any tensor when forced with ``POSITNN_BACKEND=triton``. With
``TRITON_INTERPRET=1`` (set before the first positnn Triton kernel is imported) Triton's
interpreter runs the same kernels on CPU tensors, which is how the test suite checks them,
bit for bit, against the numba backend. Results stay on the input's device: the
element-wise entry points launch one kernel and never synchronise with the host.

Besides the element-wise entry points of :class:`positnn.backends.Backend`, it provides
the quire's device parts (``quire_ops``): span scans, exact slicing, and the exact
recombination of slice GEMMs with the final rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton

from . import elementwise as ek
from .quire_ops import (  # noqa: F401  (the quire entry points of this backend)
    global_span,
    round_flat,
    round_stack,
    round_sum,
    round_terms,
    row_extent,
    scan_rows,
    split_flat,
    split_rows,
)
from .launch import block, check_device

if TYPE_CHECKING:
    from ...format import Posit

NAME = "triton"
# The quire keeps its operands on the tensor's device with this backend.
DEVICE_RESIDENT = True


def _flat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t as a contiguous 1-D tensor on ``device`` in a dtype the kernels load (float16 and
    bfloat16 load as they are; integers for decode)."""
    t = t.detach()
    if t.device != device:
        t = t.to(device)
    return t.contiguous().view(-1)


def _elementwise(kernel, operands: tuple[torch.Tensor, ...], out: torch.Tensor, *consts) -> torch.Tensor:
    check_device(out.device)
    n = out.numel()
    if n:
        b = block()
        kernel[(triton.cdiv(n, b),)](*operands, out.view(-1), n, *consts, BLOCK=b)
    return out


def round_nearest(x: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    return _elementwise(ek.round_nearest_kernel, (_flat(x, x.device),), out, fmt.nbits, fmt.es, bool(underflow))


def round_stochastic(x: torch.Tensor, rand: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=fmt.dtype, device=x.device)
    ops = (_flat(x, x.device), _flat(rand, x.device))
    return _elementwise(ek.round_stochastic_kernel, ops, out, fmt.nbits, fmt.es, bool(underflow))


def encode(x: torch.Tensor, fmt: Posit) -> tuple[torch.Tensor, int]:
    """Bit patterns and the count of non-posits. The count is read back (one sync): the
    caller raises on a bad element, so encode cannot return before knowing it."""
    out = torch.empty(x.shape, dtype=fmt.storage_dtype, device=x.device)
    bad = torch.zeros(1, dtype=torch.int64, device=x.device)
    check_device(x.device)
    n = out.numel()
    if n:
        b = block()
        ek.encode_kernel[(triton.cdiv(n, b),)](_flat(x, x.device), out.view(-1), bad, n, fmt.nbits, fmt.es, BLOCK=b)
    return out, int(bad.item())


def decode(bits: torch.Tensor, fmt: Posit) -> torch.Tensor:
    out = torch.empty(bits.shape, dtype=fmt.dtype, device=bits.device)
    return _elementwise(ek.decode_kernel, (_flat(bits, bits.device),), out, fmt.nbits, fmt.es)


def _arith(kernel, operands: tuple[torch.Tensor, ...], fmt: Posit, device: torch.device) -> torch.Tensor:
    out = torch.empty(operands[0].shape, dtype=fmt.dtype, device=device)
    return _elementwise(kernel, tuple(_flat(t, device) for t in operands), out, fmt.nbits, fmt.es)


def add(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device) -> torch.Tensor:
    return _arith(ek.add_kernel, (a, b), fmt, device)


def mul(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device) -> torch.Tensor:
    return _arith(ek.mul_kernel, (a, b), fmt, device)


def div(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device) -> torch.Tensor:
    return _arith(ek.div_kernel, (a, b), fmt, device)


def sqrt(a: torch.Tensor, fmt: Posit, device: torch.device) -> torch.Tensor:
    return _arith(ek.sqrt_kernel, (a,), fmt, device)


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, fmt: Posit, device: torch.device) -> torch.Tensor:
    return _arith(ek.fma_kernel, (a, b, c), fmt, device)

