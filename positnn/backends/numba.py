"""The numba backend: the fused loops of ``positnn.kernels`` over host memory.

Each entry point flattens its operands into contiguous host arrays (copies only where a
tensor is on another device, non-contiguous, or in a dtype the kernels do not read), runs
one parallel kernel into a new tensor of the format's carrier dtype, and moves the result
to the requested device. The kernels compile at their first call (and are cached on disk).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numba
import numpy as np
import torch

from ..kernels import arith
from ..kernels import rounding as rk

if TYPE_CHECKING:
    from ..format import Posit

NAME = "numba"


def _host_flat(t: torch.Tensor, float64: bool = False) -> np.ndarray:
    """A contiguous 1-D numpy view (or copy) of ``t`` on the host, in a kernel dtype."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if float64 and t.dtype != torch.float64:
        t = t.double()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.contiguous().view(-1).numpy()


# Below this many elements a kernel runs on one thread: waking the pool costs more than
# the loop (and, on a loaded machine, milliseconds per call). Results do not depend on it.
SERIAL_BELOW = 1 << 15


def _call(kernel, n: int, *args):
    if n >= SERIAL_BELOW or numba.get_num_threads() == 1:
        return kernel(*args)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


def _run(kernel, tensors: tuple[torch.Tensor, ...], fmt: Posit, device: torch.device, *flags: bool,
         float64: bool = True) -> torch.Tensor:
    """``kernel(*operands, out, nbits, es, *flags)`` into a new ``fmt.dtype`` tensor on ``device``."""
    arrays = [_host_flat(t, float64=float64) for t in tensors]
    out = torch.empty(tensors[0].shape, dtype=fmt.dtype)
    _call(kernel, out.numel(), *arrays, out.view(-1).numpy(), *fmt._kernel_params, *flags)
    return out if device.type == "cpu" else out.to(device)


def launch(kernel, fmt, operands: tuple[torch.Tensor, ...], *flags: bool, float64: bool = True) -> torch.Tensor:
    """Any element-wise kernel of a format (``fmt._kernel_params`` after the output) over
    the broadcast operands, on the device of the first operand that is not a scalar."""
    device = next((t.device for t in operands if t.dim() > 0), operands[0].device)
    if len(operands) > 1:
        operands = tuple(torch.broadcast_tensors(*operands))
    return _run(kernel, operands, fmt, device, *flags, float64=float64)


def round_nearest(x: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    return _run(rk.round_nearest, (x,), fmt, x.device, underflow, float64=False)


def round_stochastic(x: torch.Tensor, rand: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor:
    return _run(rk.round_stochastic, (x, rand), fmt, x.device, underflow, float64=False)


def encode(x: torch.Tensor, fmt: Posit) -> tuple[torch.Tensor, int]:
    out = torch.empty(x.shape, dtype=fmt.storage_dtype)
    bad = _call(rk.encode, out.numel(), _host_flat(x), out.view(-1).numpy(), fmt.nbits, fmt.es)
    return out.to(x.device), int(bad)


def decode(bits: torch.Tensor, fmt: Posit) -> torch.Tensor:
    return _run(rk.decode, (bits,), fmt, bits.device, float64=False)


# Correctly rounded arithmetic on float64 copies of the operands; ``underflow`` flushes
# results of magnitude <= minpos / useed to 0, as ``round_nearest`` does.
ARITH_UNDERFLOW = True


def add(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device, underflow: bool = False) -> torch.Tensor:
    return _run(arith.add, (a, b), fmt, device, underflow)


def mul(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device, underflow: bool = False) -> torch.Tensor:
    return _run(arith.mul, (a, b), fmt, device, underflow)


def div(a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device, underflow: bool = False) -> torch.Tensor:
    return _run(arith.div, (a, b), fmt, device, underflow)


def sqrt(a: torch.Tensor, fmt: Posit, device: torch.device, underflow: bool = False) -> torch.Tensor:
    return _run(arith.sqrt, (a,), fmt, device, underflow)


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, fmt: Posit, device: torch.device,
        underflow: bool = False) -> torch.Tensor:
    return _run(arith.fused_multiply_add, (a, b, c), fmt, device, underflow)


# The quire's kernels (span scans, slicing, exact recombination), on host memory.
from .numba_quire import (  # noqa: E402,F401
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

# The quire copies operands to the host for these kernels.
DEVICE_RESIDENT = False
