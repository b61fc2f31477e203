"""NaR and saturation accounting, per layer and per stage.

A NaR never turns silently into a number: every posit op records, for the tensors it
produces, how many elements are NaR and how many sit at +-maxpos (saturated: the exact
value was at least maxpos in magnitude, or was exactly maxpos; the rounded value cannot
tell the two apart). Counters live on each posit module (``module.posit_stats``) and are
read with :func:`counters` and cleared with :func:`reset`.
"""

from __future__ import annotations

import torch
from torch import nn

from .format import Posit

KINDS = ("nar", "saturation")


class LayerStats:
    """Event counters of one module: ``counts[stage][kind]`` with kind "nar" or
    "saturation" and stage one of the five policy stages."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def _bucket(self, stage: str) -> dict[str, int]:
        return self.counts.setdefault(stage, {k: 0 for k in KINDS})

    def record(self, stage: str, t: torch.Tensor, fmt: Posit | None) -> None:
        """Count the NaR and saturated elements of ``t`` (values in ``fmt``) under ``stage``.

        Two cheap reductions (max and min, which are NaN if any element is) in the common
        case where nothing is wrong; the counting pass only runs otherwise. (They measured
        20x faster than the infinity norm on CPU.)"""
        if fmt is None or t.numel() == 0:
            return
        t = t.detach()
        if -fmt.maxpos < t.amin().item() and t.amax().item() < fmt.maxpos:
            return
        nar = int(torch.isnan(t).sum())
        sat = int((t.abs() >= fmt.maxpos).sum())
        c = self._bucket(stage)
        c["nar"] += nar
        c["saturation"] += sat

    def add(self, stage: str, kind: str, n: int = 1) -> None:
        """Add ``n`` events of ``kind`` to ``stage`` directly (e.g. a NaR loss)."""
        self._bucket(stage)[kind] += n

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(c) for stage, c in self.counts.items()}

    def reset(self) -> None:
        self.counts.clear()

    def __repr__(self) -> str:
        return f"LayerStats({self.as_dict()})"


def counters(model: nn.Module, *, nonzero: bool = False) -> dict[str, dict[str, dict[str, int]]]:
    """Counters of every posit module in ``model``: {module path: {stage: {kind: n}}}.

    The root module is named "" as in ``named_modules``. ``nonzero=True`` keeps only the
    modules and stages with at least one event.
    """
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, module in model.named_modules():
        stats = getattr(module, "posit_stats", None)
        if isinstance(stats, LayerStats):
            d = stats.as_dict()
            if nonzero:
                d = {s: c for s, c in d.items() if any(c.values())}
                if not d:
                    continue
            out[name] = d
    return out


def total(model: nn.Module) -> dict[str, int]:
    """The sums over all layers and stages: {"nar": n, "saturation": m}."""
    sums = {k: 0 for k in KINDS}
    for stages in counters(model).values():
        for c in stages.values():
            for k in KINDS:
                sums[k] += c[k]
    return sums


def float_ops(model: nn.Module) -> dict[str, int]:
    """How often each op without posit semantics ran in float32 in ``model`` (only under a
    policy with ``unsupported_ops="float"``; otherwise such an op raises)."""
    engine = getattr(model, "posit_engine", None)
    return dict(engine.float_ops) if engine is not None else {}


def reset(model: nn.Module) -> None:
    """Clear the counters of every posit module in ``model`` (and its float-op counts)."""
    engine = getattr(model, "posit_engine", None)
    if engine is not None:
        engine.float_ops.clear()
    for module in model.modules():
        stats = getattr(module, "posit_stats", None)
        if isinstance(stats, LayerStats):
            stats.reset()
