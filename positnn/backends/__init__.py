"""The backend seam: which implementation runs the element-wise posit loops of a tensor.

A backend is a module (or any object) with the entry points :class:`Backend` lists,
registered under a name for the device types it serves. :func:`backend_for` picks one by
the tensor's device: "numba" on the CPU, "triton" on CUDA (when Triton is installed:
``pip install positnn[gpu]``), and "numba" for devices that have no backend of their own
(their tensors round-trip through host memory). The environment variable
``POSITNN_BACKEND`` forces one by name for every device (``POSITNN_BACKEND=triton`` with
``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors, as the tests do). Backends are imported at their
first use, and their kernels compile at their first call, never at import.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..format import Posit

ENV_VAR = "POSITNN_BACKEND"
# The backend of devices that have none registered: it reads and writes host memory.
FALLBACK = "numba"

# name -> backend, or the module path it is imported from at first use
_backends: dict[str, object] = {"numba": "positnn.backends.numba", "triton": "positnn.backends.triton"}
# device type -> backend name
_by_device: dict[str, str] = {"cpu": "numba", "cuda": "triton"}


# Backends whose import failed once (warned about once, then the fallback is used).
_unimportable: set[str] = set()


class Backend(Protocol):
    """The element-wise entry points of a backend. Operands are floating tensors already
    broadcast to one shape; results are new tensors of ``fmt.dtype`` on ``device`` (on the
    input's device for the rounding and bit-pattern ops)."""

    NAME: str

    def round_nearest(self, x: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor: ...

    def round_stochastic(self, x: torch.Tensor, rand: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor, fmt: Posit) -> tuple[torch.Tensor, int]:
        """Bit patterns (``fmt.storage_dtype``) and the count of elements that are not
        values of ``fmt``."""
        ...

    def decode(self, bits: torch.Tensor, fmt: Posit) -> torch.Tensor: ...

    # The arithmetic: correctly rounded; ``underflow`` flushes as in ``round_nearest``.
    def add(self, a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device,
            underflow: bool = False) -> torch.Tensor: ...

    def mul(self, a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device,
            underflow: bool = False) -> torch.Tensor: ...

    def div(self, a: torch.Tensor, b: torch.Tensor, fmt: Posit, device: torch.device,
            underflow: bool = False) -> torch.Tensor: ...

    def sqrt(self, a: torch.Tensor, fmt: Posit, device: torch.device, underflow: bool = False) -> torch.Tensor: ...

    def fma(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, fmt: Posit, device: torch.device,
            underflow: bool = False) -> torch.Tensor: ...

    # The exact quire's parts (see ``numba_quire`` for their contracts). With
    # DEVICE_RESIDENT the quire keeps its operands on their device; else it copies them
    # to the host first.
    DEVICE_RESIDENT: bool

    def scan_rows(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def row_extent(self, top: torch.Tensor, low: torch.Tensor) -> tuple[int, int, int]: ...

    def global_span(self, flat: torch.Tensor) -> tuple[int, int, int]: ...

    def split_rows(self, x: torch.Tensor, top: torch.Tensor, w: int, shape: tuple[int, int, int, int]) -> torch.Tensor: ...

    def split_flat(self, x: torch.Tensor, top: int, w: int, count: int) -> torch.Tensor: ...

    def round_flat(self, G: torch.Tensor, fmt: Posit, underflow: bool) -> torch.Tensor: ...

    def round_sum(self, G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit, underflow: bool) -> torch.Tensor: ...

    def round_terms(self, G: torch.Tensor, P: int, Q: int, bias: torch.Tensor | None, fmt: Posit, underflow: bool) -> torch.Tensor: ...

    def round_stack(self, G: torch.Tensor, bias: torch.Tensor | None, bias_on_rows: bool, fmt: Posit, underflow: bool) -> torch.Tensor: ...


def register(name: str, backend: Backend | str, device_types: tuple[str, ...] = ()) -> None:
    """Register ``backend`` (an object, or the path of a module to import at first use)
    under ``name``, as the backend of each device type in ``device_types``."""
    _backends[name] = backend
    for t in device_types:
        _by_device[t] = name


def available() -> tuple[str, ...]:
    """The names of the registered backends."""
    return tuple(sorted(_backends))


def get(name: str) -> Backend:
    """The backend registered as ``name``; raises ValueError listing the available ones."""
    try:
        b = _backends[name]
    except KeyError:
        raise ValueError(f"unknown positnn backend {name!r}; available: {', '.join(available())}") from None
    if isinstance(b, str):
        b = _backends[name] = importlib.import_module(b)
    return b


def backend_for(device: torch.device | str) -> Backend:
    """The backend that runs element-wise loops for tensors on ``device``:
    ``$POSITNN_BACKEND`` when set, else the one registered for the device type."""
    forced = os.environ.get(ENV_VAR)
    if forced:
        try:
            return get(forced)
        except ImportError as e:
            raise ValueError(f"positnn backend {forced!r} (from ${ENV_VAR}) cannot be imported: {e}; "
                             f"the triton backend needs `pip install positnn[gpu]`") from e
    name = _by_device.get(torch.device(device).type, FALLBACK)
    try:
        return get(name)
    except ImportError as e:
        if name == FALLBACK:
            raise
        if name not in _unimportable:
            _unimportable.add(name)
            warnings.warn(f"positnn backend {name!r} for {torch.device(device).type} tensors cannot be imported ({e}); "
                          f"falling back to {FALLBACK!r} through host memory (pip install positnn[gpu])", stacklevel=2)
        return get(FALLBACK)


def backend(device: torch.device | str = "cpu") -> str:
    """The name of the backend active for ``device`` (the CPU by default), e.g. "numba"."""
    return backend_for(device).NAME
