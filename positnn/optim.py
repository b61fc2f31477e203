"""Optimizers that update posit master weights in their O format.

``SGD``, ``Adam`` and ``AdamW`` subclass ``torch.optim.Optimizer`` (param groups, state
dicts and LR schedulers work unchanged). Each parameter's O format comes from the
``posit_policy`` tag its posit module sets; untagged parameters (or O = float) get exactly
torch's update. In O every hyperparameter is first rounded to O (as a posit unit holds
it) and each update is computed with fused single roundings where a unit with fma would
fuse them:

- SGD: g = fma(wd, w, g); v = g on the first step, else v = fma(momentum, v, g) (with
  dampening: fma(momentum, v, (1 - dampening) * g), two roundings); nesterov
  g = fma(momentum, v, g); w = fma(-lr, v, w).
- Adam: m = fma(b1, m, (1-b1) g), v = fma(b2, v, (1-b2) g g), w = fma(-lr/(1-b1^t),
  m / (sqrt(v / (1-b2^t)) + eps), w); AdamW first decays w = fma(-lr wd, w, w).

With ``rounding="stochastic"`` in the policy, the final weight update a*b + c is
evaluated in float64 and rounded stochastically instead of by the fma. Updates are in
place, which bumps each master's version counter: that is the notice that makes the
modules re-round their F/B copies before the next forward.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from .format import Posit
from .policy import LayerPolicy
from .rounding import round_scalar


def _stage(p: torch.Tensor) -> tuple[Posit | None, LayerPolicy | None]:
    lp = getattr(p, "posit_policy", None)
    return (lp.optimizer if lp is not None else None), lp


def _fused(O: Posit, lp: LayerPolicy, a: Any, b: torch.Tensor, c: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """a * b + c rounded once to O (stochastically when the policy says so, drawing from
    ``generator``)."""
    if lp.rounding == "stochastic":
        exact = torch.as_tensor(a, dtype=torch.float64) * b.double() + c.double()
        return O.round(exact, "stochastic", underflow=lp.underflow, generator=generator)
    return O.fma(a, b, c)


class _PositOptimizer(Optimizer):
    """The state every positnn optimizer adds to torch's: the generator that stochastic
    rounding draws from, seeded from torch's initial seed and saved in the state dict, so
    a resumed run draws what an uninterrupted one would."""

    updates_in_o = True  # masters stay in O: the torch-optimizer hook of positnn.nn leaves them

    def __init__(self, params: Iterable, defaults: dict) -> None:
        super().__init__(params, defaults)
        self.generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"rounding_generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rounding_generator", None)
        super().load_state_dict(state_dict)
        if rng is not None:
            self.generator.set_state(rng)


def _record(p: torch.Tensor, O: Posit) -> None:
    stats = getattr(p, "posit_stats", None)
    if stats is not None:
        stats.record("optimizer", p, O)


class SGD(_PositOptimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay,
    computed in each parameter's O format (torch's SGD for float parameters)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")}
            for ps in _batches([p for p in group["params"] if p.grad is not None]):
                sgd_update(ps, [self.state[p] for p in ps], **hyper, generator=self.generator)
        return loss


def _batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters that can be updated together: posit ones of one O format and rounding
    mode share a batch (a few fused kernel launches for the whole model instead of a
    few per tensor); float ones go one by one, as torch's single-tensor SGD."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    singles: list[list[torch.Tensor]] = []
    for p in params:
        O, lp = _stage(p)
        if O is None:
            singles.append([p])
        else:
            groups.setdefault((O, lp.rounding, lp.underflow, p.dtype, p.device), []).append(p)
    return singles + list(groups.values())


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].reshape(-1) if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts])


def sgd_update(params: list[torch.Tensor], states: list[dict], *, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, generator: torch.Generator | None = None) -> None:
    """One SGD step (in place) of parameters that share an O format (or of one float
    parameter, with torch's formulas), reading their ``.grad``s."""
    O, lp = _stage(params[0])
    if O is None:  # torch's own formulas, operation for operation
        for p, state in zip(params, states):
            g = p.grad
            if weight_decay:
                g = g.add(p, alpha=weight_decay)
            if momentum:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
                g = g.add(buf, alpha=momentum) if nesterov else buf
            p.add_(g, alpha=-lr)
        return
    bufs = [st.get("momentum_buffer") for st in states]
    if momentum and any(b is None for b in bufs) and not all(b is None for b in bufs):
        for p, st in zip(params, states):  # some buffers new, some not: one by one
            sgd_update([p], [st], lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                       nesterov=nesterov, generator=generator)
        return
    w = _flat(params)
    g = _flat([p.grad for p in params])
    if weight_decay:
        g = O.fma(round_scalar(weight_decay, O), w, g)
    if momentum:
        m = round_scalar(momentum, O)
        if bufs[0] is None:
            buf = g.clone()  # first step: v = g
        elif dampening:
            buf = O.fma(m, _flat(bufs), O.mul(round_scalar(1 - dampening, O), g))
        else:
            buf = O.fma(m, _flat(bufs), g)
        for st, p, chunk in zip(states, params, buf.split([p.numel() for p in params])):
            st["momentum_buffer"] = chunk.clone().view_as(p)
        g = O.fma(m, buf, g) if nesterov else buf
    new = _fused(O, lp, -round_scalar(lr, O), g, w, generator)
    # One check for all (NaN fails) on the CPU; on a device the counters accumulate there
    # (positnn.stats), so every parameter is recorded and nothing is read back per step.
    clean = new.device.type == "cpu" and -O.maxpos < new.amin().item() and new.amax().item() < O.maxpos
    for p, chunk in zip(params, new.split([p.numel() for p in params])):
        p.copy_(chunk.view_as(p))
        if not clean:
            _record(p, O)


class Adam(_PositOptimizer):
    """Adam (``decoupled=False``: L2 weight decay added to the gradient) computed in each
    parameter's O format; torch's Adam formulas for float parameters."""

    _decoupled = False

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adam_update(p, p.grad, self.state[p], lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                weight_decay=group["weight_decay"], decoupled=self._decoupled, generator=self.generator)
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01, as torch), in O."""

    _decoupled = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


def adam_update(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float, decoupled: bool, generator: torch.Generator | None = None) -> None:
    """One Adam/AdamW step of parameter ``p`` (in place), in its O format or as torch."""
    O, lp = _stage(p)
    b1, b2 = betas
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    t = int(state["step"].item())
    m, v = state["exp_avg"], state["exp_avg_sq"]
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    if O is None:  # torch's single-tensor Adam/AdamW
        if weight_decay:
            if decoupled:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)
        return
    if weight_decay:
        if decoupled:
            p.copy_(O.fma(-round_scalar(lr * weight_decay, O), p, p))
        else:
            g = O.fma(round_scalar(weight_decay, O), p, g)
    m.copy_(O.fma(round_scalar(b1, O), m, O.mul(round_scalar(1 - b1, O), g)))
    v.copy_(O.fma(round_scalar(b2, O), v, O.mul(round_scalar(1 - b2, O), O.mul(g, g))))
    denom = O.add(O.sqrt(O.div(v, round_scalar(bc2, O))), round_scalar(eps, O))
    p.copy_(_fused(O, lp, -round_scalar(lr / bc1, O), O.div(m, denom), p, generator))
    _record(p, O)


class GradScaler:
    """Dynamic loss scaling for posit training, in the style of ``torch.amp.GradScaler``.

    ``scaler.scale(loss).backward()`` multiplies the loss gradient by the scale S (a power
    of two, so the L multiplication is exact unless it saturates); ``scaler.step(opt)``
    looks at the model's NaR/saturation counters of the backward, gradient and loss stages
    since the previous step: if any event occurred the step is skipped and S is multiplied
    by ``backoff_factor``, otherwise every gradient is divided by S in its O format and the
    optimizer steps; after ``growth_interval`` clean steps S grows by ``growth_factor``.
    A static scale is the policy's ``loss_scale`` instead (divided out in the layers).
    """

    STAGES = ("backward", "gradient", "loss")

    def __init__(self, model: torch.nn.Module, init_scale: float = 2.0**8, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000) -> None:
        for name, v in (("init_scale", init_scale), ("growth_factor", growth_factor)):
            if not (v > 0 and math.log2(v).is_integer()):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if not (0 < backoff_factor < 1 and math.log2(backoff_factor).is_integer()):
            raise ValueError(f"backoff_factor must be a power of two below 1, got {backoff_factor}")
        self.model, self.scale_value = model, float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._good_steps, self._seen = 0, self._events()
        self.skipped = 0

    def _events(self) -> int:
        from .stats import counters

        return sum(sum(c.values()) for stages in counters(self.model).values()
                   for stage, c in stages.items() if stage in self.STAGES)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times S (only its gradient matters: the loss op scales that in L)."""
        return loss * self.scale_value

    @torch.no_grad()
    def step(self, optimizer: Optimizer) -> bool:
        """Unscale and step, or skip on NaR/saturation; returns whether it stepped."""
        events = self._events()
        # Counters only grow, except through stats.reset (then anything counted is new).
        clean = events == self._seen or events == 0
        self._seen = events
        if not clean:
            self.scale_value *= self.backoff_factor
            self._good_steps, self.skipped = 0, self.skipped + 1
            return False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    O, _ = _stage(p)
                    p.grad.copy_(p.grad / self.scale_value if O is None else O.div(p.grad, self.scale_value))
        optimizer.step()
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale_value *= self.growth_factor
            self._good_steps = 0
        return True
