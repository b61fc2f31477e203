"""The gradient scale a positnn loss announces to the layers, for one backward pass.

PositNN's loss returns softmax - onehot, not divided by the batch size N, so that the B
stage sees errors of order 1; each layer then divides its weight gradient by N in G. A
layer cannot see where its incoming gradient came from, so the loss says it: its backward
announces the factor by which its gradient exceeds the true one (N under the "positnn"
reduction, times the policy's static loss scale), keyed by the autograd graph task that
runs it. Layers divide by what was announced in *their* backward pass, and by 1 when
nothing was: with torch's losses, or a custom one, ``.grad`` is then the gradient of the
loss the user wrote. Nothing carries over from one backward pass to the next.
"""

from __future__ import annotations

import torch

_announced: dict[int, float] = {}


def _task() -> int:
    return torch._C._current_graph_task_id()


def announce(factor: float) -> None:
    """Record, from a loss's backward, that the gradient it returns is ``factor`` times the
    true gradient. Two losses announcing different factors in one backward pass cannot be
    told apart by the layers, so that raises."""
    task = _task()
    if task < 0:
        raise RuntimeError("positnn.reduction.announce must be called from inside a backward pass")
    previous = _announced.get(task)
    if previous is None:
        _announced[task] = float(factor)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _announced.pop(task, None))
    elif previous != factor:
        raise RuntimeError(
            f"two positnn losses with different gradient scales ({previous} and {factor}) in one backward pass; "
            f"use one loss, or policies with grad_reduction='mean' for both")


def divisor() -> float:
    """What a layer divides its weight gradients by in the current backward pass."""
    return _announced.get(_task(), 1.0)
