"""``convert(model, policy)``: any PyTorch model, every operation in its stage's format.

Layers with a positnn counterpart (exact type match, so a subclass with its own
``forward`` is never silently replaced) become that module through ``from_float``, with
the policy resolved for their path and their weights rounded to its O format: they run
PositNN's own autograd functions, bit for bit as the paper's layers. Everything else
(containers, LayerNorm, Embedding, attention, arithmetic in a custom ``forward``, ...) is
kept and runs under the any-model engine (``positnn.engine``): each op in the stage of
its module path, model inputs rounded to the F format of the first op that uses them.
A layer whose stages are all float32 stays torch's own module, so an all-float32 policy
gives torch's model, bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from . import nn as pnn
from .engine import attach
from .policy import Policy

SUPPORTED: dict[type, type] = {
    nn.Linear: pnn.Linear,
    nn.Conv2d: pnn.Conv2d,
    nn.MaxPool2d: pnn.MaxPool2d,
    nn.AvgPool2d: pnn.AvgPool2d,
    nn.ReLU: pnn.ReLU,
    nn.LeakyReLU: pnn.LeakyReLU,
    nn.Sigmoid: pnn.Sigmoid,
    nn.Tanh: pnn.Tanh,
    nn.Dropout: pnn.Dropout,
    nn.BatchNorm1d: pnn.BatchNorm1d,
    nn.BatchNorm2d: pnn.BatchNorm2d,
    nn.Flatten: pnn.Flatten,
    nn.LogSoftmax: pnn.LogSoftmax,
    nn.CrossEntropyLoss: pnn.CrossEntropyLoss,
    nn.MSELoss: pnn.MSELoss,
}


def convert(model: nn.Module, policy: Any = None, inplace: bool = False) -> nn.Module:
    """Return ``model`` computing every forward and backward op in the policy's formats.

    ``policy`` is anything :meth:`Policy.load` takes (a Policy, recipe string such as
    "posit8-O16-L16q", dict or .toml path). Known layers are swapped for positnn modules
    and the rest runs under the engine (see the module docstring); an op with no posit
    semantics raises :class:`~positnn.engine.UnsupportedOpError` when it runs, naming the
    op and the module path. ``inplace=False`` converts a deep copy. Raises ValueError when
    a per-layer pattern of the policy matches no module (a typo guard). Modules already
    converted are left alone.
    """
    policy = Policy.load(policy)
    names = [name for name, _ in model.named_modules() if name]
    unmatched = policy.unmatched_patterns(names)
    if unmatched:
        raise ValueError(f"policy layer pattern(s) {unmatched} match no module; module paths are: {names}")
    meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"cannot convert a model on the meta device (tensors {meta[:5]} hold no values); "
                         f"materialise it first, e.g. model.to_empty(device='cpu') and initialise its weights")
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in SUPPORTED and not policy.for_layer("").is_float:
        new = SUPPORTED[type(model)].from_float(model, policy.for_layer(""), "")
        return _with_engine(new.train(model.training), policy)
    tied = _tied_parameters(model)
    # A module reached by two paths becomes one posit module, converted under its first path.
    converted: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            path = f"{name}.{child_name}" if name else child_name
            if (type(child) in SUPPORTED and not policy.for_layer(path).is_float) or id(child) in converted:
                if id(child) not in converted:
                    new = SUPPORTED[type(child)].from_float(child, policy.for_layer(path), path)
                    converted[id(child)] = new.train(child.training)
                setattr(module, child_name, converted[id(child)])
    for owners in tied:
        _retie([(converted.get(id(m), m), attr, path) for m, attr, path in owners], policy)
    return _with_engine(model, policy)


def _with_engine(model: nn.Module, policy: Policy) -> nn.Module:
    """The engine for every op outside positnn modules, unless every stage is float32."""
    paths = [p for p, _ in model.named_modules()]
    if all(policy.for_layer(p).is_float for p in paths) or hasattr(model, "posit_engine"):
        return model
    attach(model, policy)
    return model


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Groups of (module, attribute, path) that hold one parameter object, over distinct
    modules (a module shared by two paths is one owner)."""
    owners: dict[int, dict[int, tuple[nn.Module, str, str]]] = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(m), (m, attr, f"{mpath}.{attr}" if mpath else attr))
    return [list(group.values()) for group in owners.values() if len(group) > 1]


def _retie(owners: list[tuple[nn.Module, str, str]], policy: Policy) -> None:
    """Make converted owners of one tied parameter share one posit master again; tie only
    what one O format can hold."""
    def master_format(m: nn.Module, path: str):
        return m.policy.optimizer if isinstance(m, pnn.PositModule) else policy.for_layer(path.rpartition(".")[0]).optimizer

    # Keep a positnn module's parameter: it is already an O master, tagged for the optimizers.
    owners = sorted(owners, key=lambda o: not isinstance(o[0], pnn.PositModule))
    first, attr0, path0 = owners[0]
    kept = getattr(first, attr0)
    fmt0 = master_format(first, path0)
    for m, attr, path in owners[1:]:
        fmt = master_format(m, path)
        if fmt != fmt0:
            raise ValueError(f"tied parameter {path0} / {path}: the policy gives them different O formats "
                             f"({fmt0 or 'float'} and {fmt or 'float'}); one parameter has one master")
        setattr(m, attr, kept)
    kept.posit_shared = True  # the layers sum its contributions in O (see functional)
