"""The any-model engine: every operation of a converted model in its stage's format.

``attach(model, policy)`` (called by ``positnn.convert``) registers forward hooks on each
module: they keep the module path stack the stages are looked up in, and the root's
enter and leave the :class:`~positnn.engine.mode.Engine` function mode around the forward.
Parameters that no positnn module owns get their masters rounded to O and the policy tag
the optimizers read; every parameter gets a hook that rounds its accumulated ``.grad`` to
O (a no-op for the positnn modules' own gradients, which already are O values), so every
``.grad`` is an O value however many ops contributed to it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import _get_current_function_mode

from .. import distributed
from ..policy import Policy
from .mode import Engine, StageDispatch, UnsupportedOpError, mark_batch_free

__all__ = ["Engine", "StageDispatch", "UnsupportedOpError", "attach", "engine_of"]


class _Enter:
    """Forward pre-hook: push the module's path (and enter the mode at the root)."""

    def __init__(self, engine: Engine, path: str, is_posit: bool, is_root: bool) -> None:
        self.engine, self.path, self.is_posit, self.is_root = engine, path, is_posit, is_root
        self.suspended = False

    def __call__(self, module, args):
        e = self.engine
        if self.is_root and not e.paths:
            e.__enter__()
        e.paths.append(self.path)
        if self.is_posit and not e.posit_depth and _get_current_function_mode() is e:
            e.__exit__(None, None, None)  # a positnn layer runs its own numerics: no op needs the mode
            self.suspended = True
        e.posit_depth += self.is_posit


class _Leave:
    """Forward hook (also on error): pop the path (and leave the mode at the root)."""

    def __init__(self, enter: _Enter) -> None:
        self.enter = enter

    def __call__(self, module, args, output):
        e = self.enter.engine
        e.paths.pop()
        e.posit_depth -= self.enter.is_posit
        if self.enter.suspended and not e.posit_depth:
            self.enter.suspended = False
            e.__enter__()
            if distributed.splits_batch_free():
                mark_batch_free(args, output)  # the layer's inner ops went untagged
        if self.enter.is_root and not e.paths:
            e.__exit__(None, None, None)
        return output


class _GradToO:
    """Post-accumulate-grad hook: the accumulated gradient rounded once to O."""

    def __init__(self, fmt, underflow: bool) -> None:
        self.fmt, self.underflow = fmt, underflow

    def __call__(self, p: torch.Tensor) -> None:
        with torch.no_grad():
            p.grad.copy_(self.fmt.round(p.grad, underflow=self.underflow))


def attach(model: nn.Module, policy: Policy) -> Engine:
    """Make ``model`` (already converted layer by layer) run every other op in posits."""
    from ..nn import PositModule
    from ..nn._base import ensure_torch_step_hook

    ensure_torch_step_hook()  # torch optimizers keep these masters in O too
    engine = Engine(policy, policy.unsupported_ops)
    owned: set[int] = set()
    for path, module in model.named_modules():
        is_posit = isinstance(module, PositModule)
        enter = _Enter(engine, path, is_posit, module is model)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(_Leave(enter), always_call=True)
        if is_posit:
            owned.update(id(p) for p in module.parameters())
    hooked: set[int] = set()
    for path, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) not in owned:  # a parameter the engine computes with: round it to O and tag it
                owned.add(id(p))
                lp = policy.for_layer(path)
                if lp.optimizer is not None:
                    with torch.no_grad():
                        p.data = lp.optimizer.round(p.detach(), underflow=lp.underflow).to(lp.optimizer.dtype)
                p.posit_policy = lp
            O = p.posit_policy.optimizer
            if O is not None and id(p) not in hooked:  # engine gradients arrive in G: into O, once
                hooked.add(id(p))
                p.register_post_accumulate_grad_hook(_GradToO(O, p.posit_policy.underflow))
    model.posit_engine = engine
    return engine


def engine_of(model: nn.Module) -> Engine | None:
    """The engine a converted model runs in, or None."""
    return getattr(model, "posit_engine", None)
