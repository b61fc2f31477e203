"""Data parallelism whose result does not depend on the number of processes.

Every rank holds the whole model and a contiguous share of each global batch
(:func:`shard`). A parameter gradient is a sum over the batch; each rank forms its share
of that sum as exact quire state (int64 limbs in units of minpos**2 of G,
:func:`positnn.quire.matmul_quire`), the limbs are summed by one
``torch.distributed.all_reduce(SUM)``, and every rank rounds the total once to G. Adding
integers is associative, so the rounded gradient is the one a single process computes
over the global batch, bit for bit, for any world size, and the same on every rank; the
optimizer step that follows is then identical everywhere too.

**World-size bound.** ``quire_add`` leaves every limb but the top one a digit in
[0, 2**20); each rank sends its rows in sign-magnitude form (the digits of |value|, each
carrying the value's sign, ``kernels.limbs``), so W ranks' limbs summed are below
W * 2**20 in magnitude, and :func:`positnn.quire.round_quire` (the carrying rounding of
``Quire.to_posit``) accepts limbs up to ``LIMB_BOUND`` = 2**48: any W <= 2**28
(``MAX_WORLD``) is exact. Limbs are sent as int32 when W <= 2**11 (then |sum| < 2**31),
and only the limb columns that some rank's values occupy (agreed by one small all-reduce
of their range).

**Why not a DDP communication hook.** DDP hands its hooks buckets of gradients that
autograd already accumulated in the parameters' float dtype, i.e. already rounded per
rank: the exact per-rank sums no longer exist there. The reduction therefore runs inside
each layer's backward, on the quire state, through ``torch.distributed`` collectives. A
side effect: positnn layers may keep adding later micro-batches or tied uses into
``.grad`` in place, because what they add is already the global value.

**Which sums are batch reductions.** In the paper's layers (``positnn.functional``): the
Linear weight and bias gradients (one GEMM over the batch rows), the Conv2d weight
gradient (a GEMM over N x output positions) and bias gradient (the batch sum of the
per-sample sums, which stay per rank as PositNN rounds them), the BatchNorm affine
gradients, and the positnn losses' value (an L quire sum of the per-sample losses) and
their announced factor (the global batch size, :func:`global_counts`). In the any-model
engine: in the G pass of an op (the autograd pass that computes only parameter
gradients), a contraction or quire sum (mm, bmm, addmm, dot, sum, the layer-norm affine
sums, embedding backward, convolution weight and bias gradients) whose result has as
many elements as one of the parameters being differentiated is a batch reduction. Sums
over the batch that happen in B (the gradient of a non-parameter operand broadcast over
the batch, such as a positional embedding's output) are not covered and stay per rank.

**Other quire modes.** With ``quire="none"``, ``"float32"``/``"float64"``, or a float G
stage, there is no exact state to add: each rank rounds its share, the shares are
all-gathered and added in rank order in G. That is deterministic and equal on every
rank, but it depends on the world size.

**BatchNorm statistics** are per rank (as DDP's default): a model with BatchNorm in
training mode is therefore not world-size-invariant; its affine gradients are reduced
exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as TF

from . import quire
from .kernels import accumulate as acc
from .kernels import limbs as _limbs
from .stage import Stage

# W ranks' digits sum below W * 2**LIMB; round_quire carries limbs up to LIMB_BOUND.
MAX_WORLD = quire.LIMB_BOUND >> acc.LIMB
INT32_WORLD = 1 << (31 - acc.LIMB)
DEFAULT_TIMEOUT_S = 300.0

_ACTIVE: contextvars.ContextVar["Reducer | None"] = contextvars.ContextVar("positnn_reducer", default=None)


@dataclass
class Reducer:
    """The process group a run reduces over, and counters of what it sent."""

    rank: int
    world: int
    group: object = None
    bytes_sent: int = 0
    calls: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_sent += t.numel() * t.element_size()
        self.calls += 1

    def all_reduce_(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """``t`` all-reduced in place (moved to the group's device and back)."""
        self._count(t)
        dev = t.to(self.device)
        dist.all_reduce(dev, op=op, group=self.group)
        if dev is not t:
            t.copy_(dev.to(t.device))
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape on all), in rank order."""
        self._count(t)
        dev = t.contiguous().to(self.device)
        parts = [torch.empty_like(dev) for _ in range(self.world)]
        dist.all_gather(parts, dev, group=self.group)
        return [p.to(t.device) for p in parts]

    def barrier(self) -> None:
        """Wait for every rank (through a collective, so a dead rank raises, not hangs)."""
        self.all_reduce_(torch.zeros(1, dtype=torch.int64))


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Reducer:
    """Join the process group torchrun describes (env:// rendezvous: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when this process has a CUDA device (LOCAL_RANK picks
    it), gloo otherwise. Every collective fails after ``timeout_s`` seconds instead of
    hanging when a rank is gone. Raises ValueError naming a missing or bad variable."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"distributed run needs the torchrun environment variables; missing {', '.join(missing)} "
                         f"(launch with torchrun --nproc-per-node N -m positnn train ...)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 <= rank < world or world > MAX_WORLD:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE <= {MAX_WORLD}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"collective timeout must be a number of seconds > 0, got {timeout_s}")
    device = torch.device("cpu")
    backend = "gloo"
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Reducer(rank, world, None, device=device)


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def reducing(reducer: Reducer | None) -> Iterator[Reducer | None]:
    """Within the block, positnn's layers and losses reduce over ``reducer``'s ranks."""
    token = _ACTIVE.set(reducer)
    try:
        yield reducer
    finally:
        _ACTIVE.reset(token)


def active() -> Reducer | None:
    """The reducer of the current block, or None in a single-process run."""
    return _ACTIVE.get()


def rank() -> int:
    """This process's rank (0 without a reducer)."""
    r = active()
    return 0 if r is None else r.rank


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch of ``n``: sizes differ by at
    most one, the first ``n % world`` ranks take one more. Concatenated in rank order the
    shares are the batch itself."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
    base, extra = divmod(int(n), world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def global_counts(*counts: int) -> tuple[int, ...]:
    """The sums over ranks of integer counts (one int64 all-reduce), or the counts
    themselves without a reducer."""
    r = active()
    if r is None or r.world == 1:
        return tuple(int(c) for c in counts)
    t = torch.tensor([int(c) for c in counts], dtype=torch.int64)
    return tuple(int(v) for v in r.all_reduce_(t))


def _exact(S: Stage) -> bool:
    return not S.native and S.quire == "exact"


def _operand(S: Stage, x: torch.Tensor) -> torch.Tensor:
    return S.round(x) if getattr(S, "round_operands", False) and x.dtype.is_floating_point else x


def _used_columns(limbs: torch.Tensor) -> tuple[int, int]:
    """The lowest and highest limb column holding a nonzero digit (of sign-magnitude rows)."""
    used = (limbs != 0).any(0).nonzero()
    return (int(used.min()), int(used.max())) if used.numel() else (limbs.shape[1], -1)


def _sign_magnitude(limbs: torch.Tensor) -> torch.Tensor:
    """Rows of normalised limbs (digits, top limb signed) as signed digits of |value|, so
    that a value's nonzero limbs are only those its magnitude spans (``kernels.limbs``)."""
    out = torch.empty_like(limbs)
    _limbs.sign_magnitude(limbs.contiguous().numpy(), out.numpy())
    return out


def all_reduce_quire(q: quire.Quire, nar: torch.Tensor, reducer: Reducer) -> tuple[quire.Quire, torch.Tensor]:
    """Sum ``q``'s limbs and OR the NaR marks over all ranks, in place. Only the limb
    columns some rank uses travel (their range agreed by one all-reduce of two ints), as
    int32 when the world is small enough for the sum to fit."""
    limbs = _sign_magnitude(q.limbs)
    lo, hi = _used_columns(limbs)
    span = reducer.all_reduce_(torch.tensor([-lo, hi, int(nar.any())], dtype=torch.int64), dist.ReduceOp.MAX)
    lo, hi, any_nar = -int(span[0]), int(span[1]), bool(span[2])
    out = torch.zeros_like(limbs)
    if hi >= lo:
        dtype = torch.int32 if reducer.world <= INT32_WORLD else torch.int64
        part = reducer.all_reduce_(limbs[:, lo:hi + 1].to(dtype).contiguous())
        out[:, lo:hi + 1] = part.to(torch.int64)
    q.limbs = out
    if any_nar:
        flag = reducer.all_reduce_(nar.to(torch.int32).reshape(-1).clone(), dist.ReduceOp.MAX)
        nar = flag.view(nar.shape).bool()
    else:
        nar = torch.zeros_like(nar)
    return q, nar


def _rank_order_sum(S: Stage, y: torch.Tensor, reducer: Reducer) -> torch.Tensor:
    """Every rank's rounded share added in rank order in S: deterministic, equal on every
    rank, not world-size-invariant."""
    parts = reducer.all_gather(y)
    out = parts[0]
    for p in parts[1:]:
        out = S.add(out, p)
    return out.to(y.dtype)


def batch_matmul(S: Stage, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``S.matmul(a, b)`` where K (a's last dimension) runs over this rank's share of the
    batch: the sum over all ranks' shares, rounded once (see the module docstring)."""
    r = active()
    if r is None or r.world == 1:
        return S.matmul(a, b)
    if not _exact(S):
        return _rank_order_sum(S, S.matmul(a, b), r)
    a, b = _operand(S, a), _operand(S, b)
    q, nar = quire.matmul_quire(a, b, S.fmt)
    q, nar = all_reduce_quire(q, nar, r)
    return quire.round_quire(q, nar, S.underflow).to(a.device)


def batch_sum(S: Stage, x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> torch.Tensor:
    """``S.sum(x, dim, keepdim)`` over this rank's share of the batch, summed over ranks."""
    r = active()
    if r is None or r.world == 1 or not _exact(S):
        y = S.sum(x, dim, keepdim)
        return y if r is None or r.world == 1 else _rank_order_sum(S, y, r)
    dims = list(range(x.dim())) if dim is None or (isinstance(dim, Sequence) and not len(dim)) else \
        sorted(d % max(x.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim))
    rest = [d for d in range(x.dim()) if d not in dims]
    k = math.prod(x.shape[d] for d in dims)
    flat = x.permute(*rest, *dims).reshape(-1, k)
    out = batch_matmul(S, flat, flat.new_ones(k, 1)).reshape([x.shape[d] for d in rest])
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return out


def batch_conv2d_weight_grad(S: Stage, x: torch.Tensor, d: torch.Tensor, w_shape, stride, padding, dilation,
                             groups) -> torch.Tensor:
    """``S.conv2d_weight_grad`` over this rank's share of the batch, summed over ranks: the
    GEMM over the unfolded input (K = N x output positions) as quire state."""
    r = active()
    if r is None or r.world == 1:
        return S.conv2d_weight_grad(x, d, w_shape, stride, padding, dilation, groups)
    if not _exact(S):
        return _rank_order_sum(S, S.conv2d_weight_grad(x, d, w_shape, stride, padding, dilation, groups), r)
    x, d = _operand(S, x), _operand(S, d)
    n, co, ho, wo = d.shape
    _, cg, kh, kw = w_shape
    cols = TF.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kk, L)
    k = cols.shape[1] // groups
    cols = cols.reshape(n, groups, k, ho * wo).permute(1, 0, 3, 2).reshape(groups, n * ho * wo, k)
    d3 = d.reshape(n, groups, co // groups, ho * wo).permute(1, 2, 0, 3).reshape(groups, co // groups, n * ho * wo)
    return batch_matmul(S, d3, cols).reshape(tuple(w_shape))


class ReducingStage:
    """A G stage for one engine op's parameter pass: contractions and sums whose result
    has a parameter's number of elements are batch reductions (summed over ranks before
    their one rounding); every other method is the wrapped stage's."""

    def __init__(self, stage: Stage, numels: set[int]) -> None:
        self._stage, self._numels = stage, numels

    def __getattr__(self, name: str):
        return getattr(self._stage, name)

    def _is_batch(self, shape) -> bool:
        return math.prod(shape) in self._numels

    def matmul(self, a, b, bias=None):
        a2, b2 = (a.unsqueeze(0) if a.dim() == 1 else a), (b.unsqueeze(-1) if b.dim() == 1 else b)
        shape = (*torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]), a2.shape[-2], b2.shape[-1])
        if bias is not None or not self._is_batch(shape) or a2.dim() > 3 or a2.shape[:-2] != b2.shape[:-2]:
            return self._stage.matmul(a, b, bias)
        out = batch_matmul(self._stage, a2, b2)
        out = out.squeeze(-2) if a.dim() == 1 else out
        return out.squeeze(-1) if b.dim() == 1 else out

    def sum(self, x, dim=None, keepdim=False):
        out_shape = torch.empty(x.shape, device="meta").sum(
            dim if dim is not None else tuple(range(x.dim())), keepdim=keepdim).shape if x.dim() else ()
        if not self._is_batch(out_shape):
            return self._stage.sum(x, dim, keepdim)
        return batch_sum(self._stage, x, dim, keepdim)

    def conv2d_weight_grad(self, x, d, w_shape, stride, padding, dilation, groups):
        if not self._is_batch(w_shape):
            return self._stage.conv2d_weight_grad(x, d, w_shape, stride, padding, dilation, groups)
        return batch_conv2d_weight_grad(self._stage, x, d, w_shape, stride, padding, dilation, groups)


def gradient_stage(stage: Stage, params: Sequence[torch.Tensor]) -> Stage:
    """The stage an engine op's parameter pass runs in: ``stage`` itself in a
    single-process run, else a :class:`ReducingStage` for ``params``."""
    r = active()
    if r is None or r.world == 1:
        return stage
    if stage.native:
        raise NotImplementedError("a distributed run reduces engine parameter gradients in a posit G stage; this "
                                  "layer's G stage is float (torch's own autograd would skip the reduction)")
    return ReducingStage(stage, {p.numel() for p in params})  # type: ignore[return-value]
