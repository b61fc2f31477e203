"""The modes that run every operation of a converted model in its stage.

:class:`Engine` is a ``TorchFunctionMode`` entered around the model's forward. Each torch
function a module calls (``x + y``, ``F.gelu``, ``F.layer_norm``, attention, a residual
add in a custom ``forward``) becomes one :class:`_StagedOp`: an autograd node whose
forward runs the function's aten ops in the F stage of the innermost module path, and
whose backward asks autograd for the input gradients in that path's B stage and for the
parameter gradients in its G stage, each in its own pass (so every op that forms a
parameter's gradient runs in G and nothing else does). Parameter gradients are divided by
the factor the loss announced (``positnn.reduction``), as the paper's layers do.
:class:`StageDispatch` is the ``TorchDispatchMode`` that gives each aten op its meaning
in one stage (``aten_ops``). Layers that ``convert`` swapped for positnn modules run their
own exact autograd functions, untouched by either mode.

The function mode also tags the tensors it sees computed from parameters and constants
only as *batch-free* (:func:`is_batch_free`), which a distributed run needs to tell a sum
over the batch in a B pass (``positnn.distributed``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import distributed, reduction
from ..policy import LayerPolicy, Policy
from ..stage import NATIVE, Stage, carry_mark
from . import aten_ops

F = torch.nn.functional


class UnsupportedOpError(NotImplementedError):
    """An op with no posit semantics ran in a posit stage (and the policy does not let it
    run in float)."""


class StageDispatch(TorchDispatchMode):
    """Every aten op in one stage; unknown ops decompose, or raise naming the op and path."""

    def __init__(self, stage: Stage, path: str, engine: "Engine") -> None:
        super().__init__()
        self.stage, self.path, self.engine = stage, path, engine

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if not any(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)  # integer and boolean arithmetic (indices, masks) is exact
        handler = aten_ops.TABLE.get(packet)
        if handler is not None:
            return handler(self.stage, func, args, kwargs)
        if packet in aten_ops.EXACT:
            return func(*args, **kwargs)
        decomp = aten_ops.decomposition(func)
        if decomp is not None:
            with self:  # its parts come back through this mode
                return decomp(*args, **kwargs)
        if self.engine.unsupported == "float":
            self.engine.float_ops[str(func)] = self.engine.float_ops.get(str(func), 0) + 1
            return func(*args, **kwargs)
        raise UnsupportedOpError(
            f"{func} has no posit semantics (it ran in module {self.path or '<root>'!r}, stage {self.stage.fmt}); "
            f"let such ops run in float32, counted in positnn.stats.float_ops(model), with "
            f"Policy(unsupported_ops='float')")


def _dispatch(stage: Stage, path: str, engine: "Engine"):
    return contextlib.nullcontext() if stage is NATIVE else StageDispatch(stage, path, engine)


# Functions that move no numbers or only ask about tensors: run as they are, with torch's
# autograd (their backward is exact data movement too).
DIRECT_NAMES = {
    "size", "dim", "numel", "__len__", "stride", "is_contiguous", "is_floating_point", "is_complex", "element_size",
    "data_ptr", "__repr__", "__format__", "__str__", "tolist", "item", "__bool__", "__index__", "__int__", "__float__",
    "__hash__", "__contains__", "register_hook", "retain_grad", "requires_grad_", "detach",
    "detach_", "__get__", "__set__", "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "flatten", "unflatten", "contiguous", "split", "chunk", "unbind", "narrow", "movedim",
    "select", "get_device", "type", "untyped_storage", "storage_offset", "dtype", "device", "cpu", "numpy",
    "__reduce_ex__", "__deepcopy__", "__setstate__", "_is_view", "new_zeros", "new_ones", "new_empty", "new_full",
    "zero_", "__dlpack__",
}


def _name(func: Callable) -> str:
    return getattr(func, "__name__", "")


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                             "and", "or", "xor", "lshift", "rshift")}


def _inplace_twin(func: Callable, kwargs: dict) -> tuple[Callable, dict] | None:
    """The out-of-place function of an in-place one (``add_`` -> ``add``, ``__iadd__`` ->
    ``__add__``, ``inplace=True`` -> False), or None when ``func`` is not in place."""
    if kwargs.get("inplace"):
        return func, {**kwargs, "inplace": False}
    name = _name(func)
    if name in _INPLACE_DUNDERS:
        twin = getattr(torch.Tensor, "__" + name[3:], None)
    elif name.endswith("_") and not name.endswith("__") and not name.startswith("_"):
        owner = torch.Tensor if getattr(func, "__objclass__", None) is torch._C.TensorBase or hasattr(torch.Tensor, name) \
            else torch
        twin = getattr(owner, name[:-1], None) or getattr(torch, name[:-1], None)
    else:
        return None
    if twin is None:
        raise UnsupportedOpError(f"in-place {name} has no out-of-place twin for the posit engine")
    return twin, kwargs


class _Call:
    """One staged call: the function, its flattened arguments and the stages it runs in."""

    def __init__(self, func, flat, spec, idx, slots, lp: LayerPolicy, path: str, engine: "Engine") -> None:
        self.func, self.flat, self.spec, self.path, self.engine = func, flat, spec, path, engine
        self.idx, self.slots = idx, slots  # flat positions of tensors, and which distinct tensor each is
        self.forward, self.backward, self.gradient = (Stage.of(lp, s) for s in ("forward", "backward", "gradient"))
        self.out_flat: list = []
        self.out_spec: Any = None


class _StagedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        # Operands enter as F values (parameters as they are: the op rounds its copy, and
        # their gradient is the parameter's), so the backward sees what the forward used.
        inputs = [(t.detach() if isinstance(t, nn.Parameter) else _stage_value(call.forward, t.detach()))
                  .requires_grad_(t.requires_grad) for t in tensors]
        flat = list(call.flat)
        for i, slot in zip(call.idx, call.slots):
            flat[i] = inputs[slot]
        args, kwargs = tree_unflatten(flat, call.spec)
        with torch.enable_grad(), _dispatch(call.forward, call.path, call.engine), _math_attention():
            out = call.func(*args, **kwargs)
        out_flat, call.out_spec = tree_flatten(out)
        ptrs = {x.untyped_storage().data_ptr() for x in inputs}
        results, ctx.outs = [], []
        for o in out_flat:
            if isinstance(o, torch.Tensor):
                r = o.detach()
                if r.untyped_storage().data_ptr() in ptrs:
                    r = r.clone()  # never hand autograd an unannounced alias of an input
                results.append(carry_mark(o, r))
                ctx.outs.append(o)
        call.out_flat = out_flat
        ctx.call, ctx.inputs = call, inputs
        ctx.is_param = [isinstance(t, nn.Parameter) for t in tensors]
        ctx.is_free = [is_batch_free(t) for t in tensors]
        ctx.mark_non_differentiable(*[r for r in results if not (r.dtype.is_floating_point or r.dtype.is_complex)])
        return tuple(results)

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        if ctx.outs is None:
            raise RuntimeError("backward through a posit engine op twice is not supported (retain_graph)")
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        need = ctx.needs_input_grad[1:]
        result: list[torch.Tensor | None] = [None] * len(need)
        # In a distributed run, an op that mixes batch data with batch-free operands sums
        # over the batch for those operands' gradients too (in B for a non-parameter, such
        # as a positional embedding's output): that pass reduces over ranks. An op whose
        # operands are all batch-free receives gradients that already are global values.
        split = distributed.splits_batch_free() and not all(ctx.is_free)
        wanted = {"backward": [i for i, n in enumerate(need) if n and not ctx.is_param[i]
                               and not (split and ctx.is_free[i])],
                  "reduced": [i for i, n in enumerate(need) if n and not ctx.is_param[i] and split and ctx.is_free[i]],
                  "gradient": [i for i, n in enumerate(need) if n and ctx.is_param[i]]}
        if pairs:
            outs, gos = [o for o, _ in pairs], [g for _, g in pairs]
            passes = [(name, idx) for name, idx in wanted.items() if idx]
            for k, (name, idx) in enumerate(passes):
                stage = call.gradient if name == "gradient" else call.backward
                if name == "reduced" or (name == "gradient" and not all(ctx.is_free)):
                    # batch reductions summed over ranks (positnn.distributed)
                    stage = distributed.gradient_stage(stage, [ctx.inputs[i] for i in idx])
                with _dispatch(stage, call.path, call.engine):
                    gs = torch.autograd.grad(outs, [ctx.inputs[i] for i in idx], gos,
                                             retain_graph=k < len(passes) - 1, allow_unused=True)
                if name == "gradient":
                    divisor = reduction.divisor()
                    # The divisor as a G value, as the paper's layers divide (functional._common).
                    gs = [g if g is None or divisor == 1 else stage.div(g, stage.constant(float(divisor))).to(g.dtype)
                          for g in gs]
                for i, g in zip(idx, gs):
                    result[i] = g
        ctx.outs = ctx.inputs = None  # the inner graph is spent
        return (None, *result)


_FREE = "_positnn_batch_free"


def is_batch_free(t: torch.Tensor) -> bool:
    """Whether ``t`` derives from no model input: a parameter, or a result the engine saw
    computed from parameters and constants only (``torch.arange(T)``, a positional
    embedding's output). Model inputs, buffers and tensors made outside the engine count
    as batch data, the safe side: a batch-free tensor's gradient is reduced over ranks."""
    return isinstance(t, nn.Parameter) or bool(getattr(t, _FREE, False))


def _mutates(func: Callable, kwargs: dict) -> bool:
    name = _name(func)
    return bool(kwargs.get("inplace")) or "out" in kwargs or name in _INPLACE_DUNDERS or name == "__setitem__" or \
        (name.endswith("_") and not name.endswith("__") and not name.startswith("_"))


def mark_batch_free(args: Any, out: Any, written: Any = None) -> None:
    """Tag the tensors of ``out`` batch-free when every tensor in ``args`` is; when one is
    not, the tensors ``written`` in place lose the tag too."""
    inputs = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
    free = all(is_batch_free(t) for t in inputs)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if not free and inputs and written is not None:
        outs += [t for t in tree_flatten(written)[0] if isinstance(t, torch.Tensor)]
    for t in outs:
        if not isinstance(t, nn.Parameter):
            setattr(t, _FREE, free)


def _stage_value(stage: Stage, t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the stage, keeping the -inf entries of additive masks."""
    if stage is NATIVE or not t.dtype.is_floating_point:
        return t
    r = stage.round(t)
    if bool(r.isnan().any()):
        r = torch.where(t == -math.inf, t, r)
    return r


def _math_attention():
    """Attention (also inside nn.MultiheadAttention) through its math path, which
    decomposes into ops with posit semantics."""
    return sdpa_kernel([SDPBackend.MATH])


class Engine(TorchFunctionMode):
    """The function mode of one converted model: the module path stack, the policy, and
    the count of ops the policy let run in float (``unsupported_ops="float"``)."""

    def __init__(self, policy: Policy, unsupported: str = "raise") -> None:
        super().__init__()
        self.policy, self.unsupported = policy, unsupported
        self.paths: list[str] = []
        self.posit_depth = 0
        self.float_ops: dict[str, int] = {}
        self._layer_policies: dict[str, LayerPolicy] = {}

    def __deepcopy__(self, memo):  # a copy starts with an empty path stack; policies are immutable
        return Engine(self.policy, self.unsupported)

    def __reduce__(self):
        return (_engine_from_dict, (self.policy.to_dict(), self.unsupported))

    def layer_policy(self, path: str) -> LayerPolicy:
        lp = self._layer_policies.get(path)
        if lp is None:
            lp = self._layer_policies[path] = self.policy.for_layer(path)
        return lp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = self._run(func, types, args, kwargs)
        # Only a multi-rank run reads the tags; positnn's own layers tag at their boundary
        # (engine._Leave), so the ops inside them pay nothing.
        if not self.posit_depth and distributed.splits_batch_free():
            written = (args[:1], kwargs.get("out")) if _mutates(func, kwargs) else None
            mark_batch_free((args, kwargs), out, written)
        return out

    def _run(self, func, types, args, kwargs):
        if self.posit_depth or _name(func) in DIRECT_NAMES:
            return func(*args, **kwargs)
        path = self.paths[-1] if self.paths else ""
        lp = self.layer_policy(path)
        if lp.is_float:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        idx = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        needs_grad = torch.is_grad_enabled() and any(flat[i].requires_grad for i in idx)
        if not needs_grad:
            with _dispatch(Stage.of(lp, "forward"), path, self), _math_attention():
                return func(*args, **kwargs)
        twin = _inplace_twin(func, kwargs)
        if twin is not None:  # out of place in posits, then written back, which autograd records
            result = self._run(twin[0], types, args, twin[1])
            return args[0].copy_(result)
        # One tensor passed several times (q = k = v) is one input: the op's backward sums
        # its gradients in the stage, not autograd in float.
        distinct: dict[int, int] = {}
        slots = [distinct.setdefault(id(flat[i]), len(distinct)) for i in idx]
        unique = list({id(flat[i]): flat[i] for i in idx}.values())
        call = _Call(func, flat, spec, idx, slots, lp, path, self)
        results = iter(_StagedOp.apply(call, *unique))
        out = [next(results) if isinstance(o, torch.Tensor) else o for o in call.out_flat]
        return tree_unflatten(out, call.out_spec)


def _engine_from_dict(policy: dict, unsupported: str) -> Engine:
    return Engine(Policy.from_dict(policy), unsupported)
