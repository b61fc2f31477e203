"""NaR and saturation accounting, per layer and per stage.

A NaR never turns silently into a number: every posit op records, for the tensors it
produces, how many elements are NaR and how many sit at +-maxpos (saturated: the exact
value was at least maxpos in magnitude, or was exactly maxpos; the rounded value cannot
tell the two apart). Counters live on each posit module (``module.posit_stats``) and are
read with :func:`counters` and cleared with :func:`reset`.

On an accelerator (any device but the CPU) the counts accumulate in a small tensor on the
tensor's device, with no host synchronisation per op; they are read back only when the
counters are read (``as_dict``, ``counts``).
"""

from __future__ import annotations

import torch
from torch import nn

from .format import Posit

KINDS = ("nar", "saturation")


def _on_host(t: torch.Tensor) -> bool:
    """Whether ``t``'s counts are read at once (CPU) or accumulate on its device."""
    return t.device.type == "cpu"


class LayerStats:
    """Event counters of one module: ``counts[stage][kind]`` with kind "nar" or
    "saturation" and stage one of the five policy stages."""

    __slots__ = ("_counts", "_pending")

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}
        # stage -> int64 tensor [nar, saturation] on a device, not yet read back
        self._pending: dict[str, torch.Tensor] = {}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """``{stage: {kind: n}}``, with the device-side counts read back first."""
        self._flush()
        return self._counts

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for stage, t in pending.items():
            nar, sat = (int(v) for v in t.tolist())
            if nar or sat:  # as on the CPU, a stage with no event gets no bucket
                c = self._bucket(stage)
                c["nar"] += nar
                c["saturation"] += sat

    def _bucket(self, stage: str) -> dict[str, int]:
        return self._counts.setdefault(stage, {k: 0 for k in KINDS})

    def record(self, stage: str, t: torch.Tensor, fmt: Posit | None) -> None:
        """Count the NaR and saturated elements of ``t`` (values in ``fmt``) under ``stage``.

        Two cheap reductions (max and min, which are NaN if any element is) in the common
        case where nothing is wrong; the counting pass only runs otherwise. (They measured
        20x faster than the infinity norm on CPU.)"""
        if fmt is None or t.numel() == 0:
            return
        t = t.detach()
        if not _on_host(t):
            events = torch.stack([torch.isnan(t).sum(), (t.abs() >= fmt.maxpos).sum()])
            prev = self._pending.get(stage)
            self._pending[stage] = events if prev is None else prev + events
            return
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
        self._counts.clear()
        self._pending.clear()

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
