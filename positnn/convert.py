"""``convert(model, policy)``: swap the torch layers of any module tree for posit ones.

Each supported layer (exact type match, so a subclass with its own ``forward`` is never
silently replaced) becomes its ``positnn.nn`` counterpart through ``from_float`` with the
policy resolved for its path; its weights are rounded to that layer's O format. Containers
(``Sequential``, ``ModuleList``, custom modules with children) are kept, with their
children converted: arithmetic a container does in its own ``forward`` (a residual add,
say) stays float, and the next posit layer rounds its result to that layer's F.

Every arithmetic posit op rounds its input to its F format, so the first layer's input
(the data) is rounded to the first layer's F format, and a layer whose F differs from the
previous layer's converts at the boundary.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from . import nn as pnn
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
# Modules that do no arithmetic and hold no state: kept as they are.
PASSTHROUGH: tuple[type, ...] = (nn.Identity,)


class UnsupportedModuleError(TypeError):
    """Raised by :func:`convert` with every module it cannot convert, by path and type."""


def _is_container(module: nn.Module) -> bool:
    has_children = next(module.children(), None) is not None
    own_state = next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None
    return has_children and not own_state


def unsupported_modules(model: nn.Module) -> list[tuple[str, str]]:
    """(path, type name) of every module of ``model`` that :func:`convert` cannot handle."""
    bad: list[tuple[str, str]] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, pnn.PositModule) or type(module) in SUPPORTED:
            skip.append(name)
        elif isinstance(module, PASSTHROUGH) or _is_container(module):
            continue
        else:
            bad.append((name or "<root>", type(module).__name__))
    return bad


def convert(model: nn.Module, policy: Any = None, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every supported layer replaced by its posit counterpart.

    ``policy`` is anything :meth:`Policy.load` takes (a Policy, recipe string such as
    "posit8-O16-L16q", dict or .toml path). Works on any ``nn.Module`` tree; ``inplace=False``
    converts a deep copy. Raises :class:`UnsupportedModuleError` listing every unsupported
    module by path and type, and ValueError when a per-layer pattern of the policy matches
    no module (a typo guard). Modules already converted are left alone.
    """
    policy = Policy.load(policy)
    bad = unsupported_modules(model)
    if bad:
        listing = ", ".join(f"{path!r} ({kind})" for path, kind in bad)
        supported = ", ".join(sorted(t.__name__ for t in SUPPORTED))
        raise UnsupportedModuleError(
            f"cannot convert {len(bad)} module(s): {listing}. Supported layers: {supported}; "
            f"containers whose own forward only calls their children are kept."
        )
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
    if type(model) in SUPPORTED:
        return SUPPORTED[type(model)].from_float(model, policy.for_layer(""), "")
    tied = _tied_parameters(model)
    # A module reached by two paths becomes one posit module, converted under its first path.
    converted: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):  # named_children() skips repeats
            if type(child) in SUPPORTED or id(child) in converted:
                path = f"{name}.{child_name}" if name else child_name
                if id(child) not in converted:
                    converted[id(child)] = SUPPORTED[type(child)].from_float(child, policy.for_layer(path), path)
                setattr(module, child_name, converted[id(child)])
    for owners in tied:
        _retie([(converted.get(id(m), m), attr, path) for m, attr, path in owners])
    return model


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Groups of (module, attribute, path) that hold one parameter object, over distinct
    modules (a module shared by two paths is one owner)."""
    owners: dict[int, dict[int, tuple[nn.Module, str, str]]] = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for attr, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(id(m), (m, attr, f"{mpath}.{attr}" if mpath else attr))
    return [list(group.values()) for group in owners.values() if len(group) > 1]


def _retie(owners: list[tuple[nn.Module, str, str]]) -> None:
    """Make converted owners of one tied parameter share one posit master again; tie only
    what one O format can hold."""
    first, attr0, path0 = owners[0]
    kept = getattr(first, attr0)
    fmt0 = _master_format(first)
    for m, attr, path in owners[1:]:
        if _master_format(m) != fmt0:
            raise ValueError(f"tied parameter {path0} / {path}: the policy gives them different O formats "
                             f"({fmt0 or 'float'} and {_master_format(m) or 'float'}); one parameter has one master")
        setattr(m, attr, kept)
    kept.posit_shared = True  # the layers sum its contributions in O (see functional)


def _master_format(module: nn.Module):
    return module.policy.optimizer if isinstance(module, pnn.PositModule) else None
