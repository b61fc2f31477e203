"""Launch settings of the Triton kernels: block sizes, and which devices they can run on."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

# The interpreter runs a program's block as numpy arrays: large blocks amortise its
# per-operation overhead. Compiled kernels want blocks of a few warps.
GPU_BLOCK = 1024
INTERPRETER_BLOCK = 1 << 14


def interpreting() -> bool:
    """Whether positnn's kernels were built for Triton's interpreter: ``TRITON_INTERPRET=1``
    must be set when they are imported (``triton.jit`` reads it then, not at launch)."""
    from .elementwise import round_nearest_kernel

    return isinstance(round_nearest_kernel, InterpretedFunction)


def block() -> int:
    """Elements per program of the element-wise kernels."""
    return INTERPRETER_BLOCK if interpreting() else GPU_BLOCK


def check_device(device: torch.device) -> None:
    """Refuse a CPU tensor outside the interpreter, with what to do instead."""
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "the triton backend runs CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing positnn's Triton kernels, or use the numba backend for CPU tensors "
            "(unset POSITNN_BACKEND)"
        )
