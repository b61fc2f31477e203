"""What every autograd op shares: policy resolution, its stages, NaR counting, and the
finishing of parameter gradients (the G division and the O ``.grad`` sum)."""

from __future__ import annotations

import functools

import torch

from ..format import Posit
from ..policy import LayerPolicy, layer_policy
from ..stage import Stage
from ..stats import LayerStats

IntPair = int | tuple[int, int]

# The functional API's name for the one resolver (a LayerPolicy, a Policy, None, a recipe ...).
resolve = layer_policy


@functools.lru_cache(maxsize=1024)
def stage(lp: LayerPolicy, name: str) -> Stage:
    """The stage ``name`` of ``lp`` as the ops use it: operands taken as they are (each op
    keeps its tensors in their stages itself), so an op on values of two stages is exact
    before its one rounding. Cached: the ops ask for it on every call."""
    return Stage.of(lp, name, round_operands=False)


def ops(fmt: Posit | None) -> Stage:
    """The arithmetic of a bare format, nearest rounding: a posit stage (Posit's correctly
    rounded ops) or torch's own for None."""
    return stage(LayerPolicy(forward=fmt), "forward")


def _record(stats: LayerStats | None, name: str, t: torch.Tensor | None, S: Stage) -> None:
    if stats is not None and t is not None:
        stats.record(name, t, S.fmt)


def _error_in(gy: torch.Tensor, S: Stage, stats: LayerStats | None, name: str) -> torch.Tensor:
    """The incoming error converted to a stage, counting saturation there (where a loss
    scale that is too large shows first)."""
    d = S.round(gy)
    _record(stats, name, d, S)
    return d


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _weight_copies(lp: LayerPolicy, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   weight_f: torch.Tensor | None, weight_b: torch.Tensor | None, bias_f: torch.Tensor | None):
    """The F and B copies of a weight and the F copy of a bias: the module's cached ones
    when given, else rounded from the masters here."""
    F, B = stage(lp, "forward"), stage(lp, "backward")
    w_f = None if weight is None else (F.round(weight.detach()) if weight_f is None else weight_f)
    w_b = None if weight is None else (B.round(weight.detach()) if weight_b is None else weight_b)
    b_f = None if bias is None else (F.round(bias.detach()) if bias_f is None else bias_f)
    return w_f, w_b, b_f


def _param_grads(parts: list[tuple[torch.Tensor, torch.Tensor | None]], divisor: float, lp: LayerPolicy,
                 stats: LayerStats | None) -> list[torch.Tensor | None]:
    """Finish a layer's G-quire parameter gradients [(g, param), ...] in one go (one
    division and at most one O rounding for all of them): divide by ``divisor`` (rounded to
    G) in G, then
    add into each parameter's O ``.grad``. Returns, per parameter, what autograd should
    accumulate (None where the O sum was done in place, or where the parameter is None)."""
    wanted = [p is not None for _, p in parts]
    parts = [(g, p) for g, p in parts if p is not None]
    if not parts:
        return [None] * len(wanted)
    G, O = stage(lp, "gradient"), stage(lp, "optimizer")
    flat = torch.cat([g.reshape(-1) for g, _ in parts]) if len(parts) > 1 else parts[0][0].reshape(-1)
    _record(stats, "gradient", flat, G)  # the quire results, before the division shrinks them
    if divisor != 1:
        # The divisor as a G value, as PositNN's StdTensor /= T(batch_size).
        flat = G.div(flat, G.constant(float(divisor)))
    pieces = flat.split([p.numel() for _, p in parts])
    if O.native:  # autograd's own float accumulation is then the O sum
        return _spread([g.view(p.shape) for g, (_, p) in zip(pieces, parts)], wanted)
    # Into an empty O buffer: O.round(g), which is only a cast when G's values are O's.
    flat_o = flat.to(O.fmt.dtype) if O.contains(G) else O.round(flat)
    out: list[torch.Tensor | None] = []
    for g_g, g_o, (_, p) in zip(pieces, flat_o.split([p.numel() for _, p in parts]), parts):
        shared = getattr(p, "posit_shared", False)
        if p.grad is None and not shared:
            out.append(g_o.view(p.shape))
            continue
        with torch.no_grad():  # into an existing O buffer: one rounding of the exact sum
            if p.grad is None:
                p.grad = g_o.view(p.shape).clone()
            else:
                p.grad.copy_(O.add(p.grad, g_g.view(p.shape)))
        _record(stats, "optimizer", p.grad, O)
        out.append(None)
    return _spread(out, wanted)


def _spread(values: list, wanted: list[bool]) -> list:
    """Put ``values`` at the wanted positions, None elsewhere."""
    it = iter(values)
    return [next(it) if w else None for w in wanted]


def _batch(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


def fresh(forward):
    """An autograd Function's ``forward`` whose output is never a view: autograd forbids
    in-place ops on a custom Function's view outputs, and models do ``out += identity``."""
    @functools.wraps(forward)
    def wrapped(ctx, *args):
        y = forward(ctx, *args)
        return y.clone() if isinstance(y, torch.Tensor) and y._base is not None else y
    return wrapped
