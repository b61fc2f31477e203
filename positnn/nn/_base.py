"""The base of every posit module: its policy, NaR counters, O master tensors with cached
F/B copies, and a state dict of bit patterns.

Master parameters (and BatchNorm's running statistics) live in the O format of the
module's policy as ordinary ``nn.Parameter``s of ``O.dtype``. Their F and B copies are
re-rounded lazily, keyed by the master's version counter: any in-place update (a posit
optimizer's step, ``load_state_dict``) bumps the counter, so the next forward sees fresh
copies without the optimizer having to call anything.

A ``torch.optim`` optimizer may step posit masters too: it computes torch's update in the
master's carrier dtype, and a global optimizer step hook (registered with the first posit
module or engine) then rounds every posit master it stepped back to its O format, round to nearest,
so the model stays in O and can be saved. Its own state (momentum, Adam moments) stays in
the carrier float. ``positnn.optim`` computes the whole update in O instead.

Each master parameter is tagged with ``posit_policy`` (the module's LayerPolicy) and
``posit_stats``, which the optimizers in ``positnn.optim`` read; tags are restored after
``copy.deepcopy`` and unpickling (``__setstate__``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..policy import Format, PolicySpec, layer_policy, parse_format
from ..rounding import maybe_round, scaled_round
from ..stats import LayerStats

_CONVERT_FORMAT: contextvars.ContextVar[bool] = contextvars.ContextVar("positnn_convert_format", default=False)
_TORCH_STEP_HOOK: list = []
__all__ = ["PolicySpec", "PositModule", "layer_policy", "load_state_dict"]


def ensure_torch_step_hook() -> None:
    """Register (once) the torch-optimizer hook that keeps posit masters in O."""
    if not _TORCH_STEP_HOOK:
        _TORCH_STEP_HOOK.append(register_optimizer_step_post_hook(_round_masters_after_step))


@torch.no_grad()
def _round_masters_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After a torch optimizer's step, round the posit masters it updated back to O."""
    if getattr(optimizer, "updates_in_o", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            lp = getattr(p, "posit_policy", None)
            if lp is not None and lp.optimizer is not None and p.grad is not None:
                p.copy_(lp.optimizer.round(p, underflow=lp.underflow))


class PositModule(nn.Module):
    """A module computing under a :class:`~positnn.policy.LayerPolicy`.

    Subclasses list in ``_master_names`` the parameters and buffers kept in O (encoded as
    bit patterns in the state dict) and call :meth:`_copy` for their F/B copies.
    """

    _master_names: tuple[str, ...] = ()

    def __init__(self, policy: PolicySpec = None, name: str = "") -> None:
        super().__init__()
        ensure_torch_step_hook()
        self.policy = layer_policy(policy, name)
        self.posit_stats = LayerStats()
        self._copy_cache: dict[Format, tuple[tuple, dict[str, torch.Tensor]]] = {}

    # -- masters and copies ----------------------------------------------------------------
    def _master(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """``value`` rounded to O (in O's carrier dtype), or unchanged when O is float."""
        if value is None:
            return None
        O = self.policy.optimizer
        with torch.no_grad():
            return value.detach().clone() if O is None else maybe_round(value.detach(), O, self.policy)

    def _masters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._master_names:
            t = getattr(self, name, None)
            if isinstance(t, torch.Tensor):
                yield name, t

    def _tag_params(self) -> None:
        for _, t in self._masters():
            if isinstance(t, nn.Parameter):
                t.posit_policy = self.policy
                t.posit_stats = self.posit_stats

    def _copy(self, name: str, stage: str) -> torch.Tensor | None:
        """The ``stage`` copy of parameter ``name`` (weight or bias)."""
        if getattr(self, name) is None:
            return None
        fmt = getattr(self.policy, stage)
        if fmt == self.policy.optimizer:
            return getattr(self, name).detach()
        return self._copies(fmt)[name]

    def _copies(self, fmt: Format) -> dict[str, torch.Tensor]:
        """Copies in ``fmt`` of all parameters, rounded together in one pass and only after
        a master changed (keyed by version counters; stages sharing a format share them)."""
        params = [(n, t) for n, t in self._masters() if isinstance(t, nn.Parameter)]
        key = tuple((t._version, t.data_ptr(), id(t)) for _, t in params)
        hit = self._copy_cache.get(fmt)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            if self.policy.scaling == "tensorwise":  # one scale per tensor (Policy.scaling)
                lp = self.policy
                value = {n: scaled_round(t.detach(), fmt, lp.rounding, underflow=lp.underflow) for n, t in params}
            else:
                flat = torch.cat([t.detach().reshape(-1) for _, t in params]) if len(params) > 1 else params[0][1].detach().reshape(-1)
                pieces = maybe_round(flat, fmt, self.policy).split([t.numel() for _, t in params])
                value = {n: piece.view(t.shape) for piece, (n, t) in zip(pieces, params)}
        self._copy_cache[fmt] = (key, value)
        return value

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._copy_cache = {}
        self._tag_params()

    def extra_repr(self) -> str:
        return self.policy.describe()

    # -- state dict: bit patterns plus formats ----------------------------------------------
    def get_extra_state(self) -> dict:
        O = self.policy.optimizer
        return {"formats": {name: str(O) for name, _ in self._masters()} if O is not None else {}}

    def set_extra_state(self, state: Any) -> None:
        pass  # formats are checked tensor by tensor in _load_from_state_dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        O = self.policy.optimizer
        if O is not None:
            for name, t in self._masters():
                destination[prefix + name] = O.encode(t.detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        saved = extra.get("formats", {}) if isinstance(extra, dict) else {}
        convert = _CONVERT_FORMAT.get()
        O = self.policy.optimizer
        local = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        for name, current in self._masters():
            key = prefix + name
            if key not in local:
                continue
            value = local[key]
            src: Format = None
            if name in saved:  # bit patterns: integers, or torch's float8/16 storage of a Float
                src = parse_format(saved[name], f"{prefix}_extra_state format of {name}")
                value = src.decode(value)
            elif not value.dtype.is_floating_point:
                error_msgs.append(f"{key}: integer tensor without a posit format in {prefix}_extra_state")
                local[key] = current.detach()
                continue
            if src != O:
                if not convert:
                    error_msgs.append(
                        f"{key}: saved as {src or 'float'}, this module keeps {O or 'float'}; converting is "
                        f"explicit: positnn.nn.load_state_dict(model, state, convert_format=True)"
                    )
                    local[key] = current.detach()
                    continue
                value = maybe_round(value, O, self.policy) if O is not None else value
            local[key] = value.to(current.dtype)
        super()._load_from_state_dict(local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if prefix + "_extra_state" in missing_keys:
            missing_keys.remove(prefix + "_extra_state")  # a float checkpoint has none

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False, *,
                        convert_format: bool = False):
        """As ``nn.Module.load_state_dict``; ``convert_format=True`` rounds tensors saved in
        another format (or in float) to this module's formats instead of refusing them."""
        token = _CONVERT_FORMAT.set(convert_format)
        try:
            return super().load_state_dict(state_dict, strict, assign)
        finally:
            _CONVERT_FORMAT.reset(token)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *, convert_format: bool = False,
                    strict: bool = True):
    """``model.load_state_dict(state_dict)`` for any model holding posit modules.

    Posit tensors are stored as bit patterns with their formats; loading one saved in a
    different format, or a float tensor into a posit module, fails unless
    ``convert_format=True``, which rounds it to the module's O format. Same-format loads
    are bit-exact.
    """
    token = _CONVERT_FORMAT.set(convert_format)
    try:
        return nn.Module.load_state_dict(model, state_dict, strict)
    finally:
        _CONVERT_FORMAT.reset(token)

