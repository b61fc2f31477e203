"""Precision policies: which number format each of the five training stages uses.

PositNN's five stages (notes, section 4) are named as the fields of :class:`Policy`:

- ``forward`` (F): every forward dot product and activation;
- ``backward`` (B): the error propagated to a layer's input;
- ``gradient`` (G): the weight gradient, accumulated in a G quire, rounded to G, divided by
  the batch size in G;
- ``optimizer`` (O): the master weights, their ``.grad`` buffers and the optimizer state;
- ``loss`` (L): softmax, cross entropy and the loss gradient.

A stage is a :class:`~positnn.format.Posit`, a binary :class:`~positnn.floatformat.Float`
(fp8e4m3, fp8e5m2, fp16, bf16, eXmY: simulated, rounded like a posit stage) or ``None``
(plain float32: no rounding at all),
so float baselines and partial studies run through the same code. :meth:`Policy.for_layer`
resolves the per-layer overrides into a :class:`LayerPolicy` for one module, and
:func:`layer_policy` does so from any policy spec. The numerics of a stage live in
:mod:`positnn.stage` (and the bare-format helpers in :mod:`positnn.rounding`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping


try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (see pyproject.toml)
    import tomli as tomllib

from .floatformat import Float
from .format import ROUNDING_MODES, Posit
from .rounding import is_subformat as is_subformat  # noqa: F401 - moved; re-exported for one release
from .rounding import maybe_round as maybe_round  # noqa: F401 - moved; re-exported for one release
from .rounding import round_scalar as round_scalar  # noqa: F401 - moved; re-exported for one release

STAGES = ("forward", "backward", "gradient", "optimizer", "loss")
STAGE_LETTERS = {"F": "forward", "B": "backward", "G": "gradient", "O": "optimizer", "L": "loss"}
QUIRE_MODES = ("exact", "none", "float32", "float64")
GRAD_REDUCTIONS = ("positnn", "mean")
ON_NAR = ("raise", "report")
UNSUPPORTED_OPS = ("raise", "float")
SCALINGS = ("none", "tensorwise")
FLOAT_NAMES = ("float32", "fp32", "float", "none")
# Keys a per-layer override may set: the numerics, not the training-loop behaviour.
LAYER_KEYS = STAGES + ("quire", "underflow", "rounding", "scaling")

Format = Posit | Float | None


def parse_format(value: Any, what: str = "format") -> Format:
    """A stage format from a Posit, a Float, None, "float32"/"fp32" (torch's own float32),
    a posit name ("posit(8,2)", "p16e1", "posit8") or a float name ("fp8e4m3", "fp8e5m2",
    "fp16", "bf16", "e5m10", "float(5,10)"); raises ValueError naming ``what`` and listing
    the accepted forms."""
    if value is None or isinstance(value, (Posit, Float)):
        return value
    if isinstance(value, str):
        if value.strip().lower() in FLOAT_NAMES:
            return None
        for kind in (Posit, Float):
            try:
                return kind.parse(value)
            except ValueError:
                pass
    raise ValueError(
        f"{what}: cannot read {value!r} as a format; use a Posit, a Float, None, 'float32'/'fp32', "
        f"a posit name such as 'posit(8,2)', 'p16e1' or 'posit8' (es = 2), "
        f"or a float name such as 'fp8e4m3', 'fp8e5m2', 'fp16', 'bf16', 'e5m10' or 'float(5,10)'"
    )


def _choice(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerPolicy:
    """The resolved numerics of one module: its five stage formats and how it rounds.

    Built by :meth:`Policy.for_layer`; functional ops take one of these. ``loss_scale`` is
    the static factor the loss gradient is multiplied by (and the layers divide by).
    """

    forward: Format = None
    backward: Format = None
    gradient: Format = None
    optimizer: Format = None
    loss: Format = None
    quire: str = "exact"
    underflow: bool = False
    rounding: str = "nearest"
    scaling: str = "none"
    grad_reduction: str = "mean"
    loss_scale: float = 1.0
    on_nar: str = "raise"

    @property
    def is_float(self) -> bool:
        """True when every stage is plain float (the op then equals the torch op)."""
        return all(getattr(self, s) is None for s in STAGES)

    def describe(self) -> str:
        """Short text for ``extra_repr``: "F=posit(8,2) B=... quire=exact"."""
        parts = [f"{s[0].upper()}={getattr(self, s) or 'float'}" for s in STAGES]
        return " ".join(parts) + f" quire={self.quire}"


@dataclass(frozen=True)
class Policy:
    """Which format each training stage uses, globally and per layer.

    Stage fields accept a ``Posit``, a ``Float``, ``None``/"float32" (no rounding), or a
    posit or float name.
    ``quire`` is the accumulation mode of every dot product ("exact", "none", "float32",
    "float64"; a Policy built in Python defaults to "exact", recipe strings follow the paper:
    a trailing ``q`` means "exact", none means "none"). ``layers`` maps a module path
    ("conv1", "features.0") or an ``fnmatch`` glob ("fc*", "*.conv?") to a dict of stage
    overrides (keys from ``LAYER_KEYS``); see :meth:`for_layer` for how they combine
    (deeper paths win; at one path an exact name beats globs, later globs beat earlier).
    ``grad_reduction`` "positnn" leaves the loss gradient unscaled and divides weight
    gradients by the batch size in G, "mean" is PyTorch's convention;
    the default (None) picks "positnn" when any stage is a posit and "mean" otherwise.
    ``loss_scale`` is a static factor for the loss gradient, divided out again in the
    weight gradients. ``on_nar`` says whether a NaR loss raises FloatingPointError or is
    only counted. ``unsupported_ops`` says what the any-model engine does with an op that
    has no posit semantics: "raise" (the default) an error naming it, or "float": run it in
    float32 and count it (``positnn.stats.float_ops(model)``).

    ``scaling`` is the per-tensor scaling of GEMM and convolution operands that FP8
    training needs: "none" (the default), or "tensorwise", torchao's dynamic recipe with
    power-of-two scales: x is rounded as round(x * s) / s, s = 2**k the largest power of
    two with amax(|x|) * s <= the stage format's max (``positnn.rounding.scaled_round``),
    for the weights' F and B copies (one scale per tensor, in positnn's layers and under
    the engine alike) and, under the engine, for every other operand that a matmul or
    convolution in F, B or G rounds into its stage (inputs, incoming gradients). Scaling by
    a power of two is exact, so the quire stays exact; dot products and sums are rounded
    once, unscaled, to their stage, which holds every tensor.
    """

    forward: Format = None
    backward: Format = None
    gradient: Format = None
    optimizer: Format = None
    loss: Format = None
    quire: str = "exact"
    underflow: bool = False
    rounding: str = "nearest"
    scaling: str = "none"
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    grad_reduction: str | None = None
    loss_scale: float = 1.0
    on_nar: str = "raise"
    unsupported_ops: str = "raise"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        for s in STAGES:
            set_(s, parse_format(getattr(self, s), s))
        _choice(self.quire, QUIRE_MODES, "quire")
        _choice(self.rounding, ROUNDING_MODES, "rounding")
        _choice(self.on_nar, ON_NAR, "on_nar")
        _choice(self.unsupported_ops, UNSUPPORTED_OPS, "unsupported_ops")
        _choice(self.scaling, SCALINGS, "scaling")
        if not isinstance(self.underflow, bool):
            raise ValueError(f"underflow must be a bool, got {self.underflow!r}")
        if self.grad_reduction is None:
            set_("grad_reduction", "mean" if all(getattr(self, s) is None for s in STAGES) else "positnn")
        _choice(self.grad_reduction, GRAD_REDUCTIONS, "grad_reduction")
        if (
            isinstance(self.loss_scale, bool)
            or not isinstance(self.loss_scale, (int, float))
            or not 0 < self.loss_scale <= sys.float_info.max  # also refuses nan, inf and ints beyond float
        ):
            raise ValueError(f"loss_scale must be a finite positive number, got {self.loss_scale!r}")
        set_("loss_scale", float(self.loss_scale))
        if not isinstance(self.layers, Mapping):
            raise ValueError(f"layers must map module names or globs to dicts of overrides, got {self.layers!r}")
        layers = {}
        for pattern, over in self.layers.items():
            if not isinstance(pattern, str) or not isinstance(over, Mapping):
                raise ValueError(f"layers[{pattern!r}] must be a dict of overrides, got {over!r}")
            layers[pattern] = MappingProxyType(_normalise_overrides(over, f"layers[{pattern!r}]"))
        set_("layers", MappingProxyType(layers))

    def __hash__(self) -> int:
        layers = tuple((k, tuple(sorted(v.items()))) for k, v in self.layers.items())
        return hash(tuple(getattr(self, f.name) for f in fields(self) if f.name != "layers") + (layers,))

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Policy":
        """A policy from a recipe string, as the paper names its runs.

        "posit8-O16-L16q": F = B = G = posit(8,2), O = L = posit(16,2), quire "exact".
        A base format ("posit8", "posit(16,1)", "p8e2", "fp8e4m3", "bf16", "float32") sets
        every stage; each "-<letter><format>" part (letters F, B, G, O, L; format "16"
        meaning posit(16,2), "(16,1)", "p16e1", a float name such as "fp8e5m2", "fp16",
        "bf16", "e5m10", or "float32") overrides one stage; a trailing "q" means quires
        ("exact", for floats as for posits), no "q" means "none".

        "fp8e4m3-Bfp8e5m2-Gfp8e5m2-Ofp16-Lfp16q": F in OCP E4M3, B and G in E5M2, O and L
        in fp16, exact quires (the FP8 training recipe; "-O16-L16q" keeps O and L in
        posit(16,2), "-Obf16-Lbf16q" in bfloat16).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"recipe must be a non-empty string such as 'posit8-O16-L16q', got {text!r}")
        body = text.strip()
        quire = "none"
        if body[-1] in "qQ" and parse_format_or_none(body) is None:
            body, quire = body[:-1], "exact"
        parts = body.split("-")
        base = parse_format(parts[0], f"recipe {text!r}: base format {parts[0]!r}")
        stages: dict[str, Format] = {s: base for s in STAGES}
        given: dict[str, str] = {}  # stage letter -> the part that set it
        for part in parts[1:]:
            letter, rest = part[:1].upper(), part[1:]
            if letter not in STAGE_LETTERS or not rest:
                raise ValueError(
                    f"recipe {text!r}: cannot read part {part!r}; expected <stage><format> with stage one of "
                    f"{tuple(STAGE_LETTERS)} and format like '16', '(16,1)', 'p16e1', 'fp8e5m2', 'bf16' or 'float32'"
                )
            if letter in given:
                raise ValueError(f"recipe {text!r}: stage {letter} is given twice, as {given[letter]!r} and {part!r}")
            given[letter] = part
            fmt_text = f"posit{rest}" if re.fullmatch(r"\d+|\(\s*\d+\s*,\s*\d+\s*\)", rest) else rest
            stages[STAGE_LETTERS[letter]] = parse_format(fmt_text, f"recipe {text!r}: stage {letter}")
        if quire == "exact" and all(v is None for v in stages.values()):
            raise ValueError(f"recipe {text!r}: a trailing 'q' (quire) needs at least one posit or float-format stage")
        return cls(**stages, quire=quire)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Policy":
        """A policy from a dict (e.g. a parsed TOML table). Keys are the field names, plus
        "recipe" (a recipe string applied first; the other keys then override it) and the
        one-letter stage names F, B, G, O, L. Unknown keys raise ValueError listing the
        allowed ones."""
        if isinstance(d, Policy):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"policy dict must be a mapping, got {type(d).__name__}")
        allowed = {f.name for f in fields(cls)} | {"recipe"} | set(STAGE_LETTERS)
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown policy key(s) {unknown}; allowed: {sorted(allowed)}")
        _refuse_letter_conflicts(d, "policy")
        kwargs = {STAGE_LETTERS.get(k, k): v for k, v in d.items() if k != "recipe"}
        if "recipe" in d:
            return replace(cls.parse(d["recipe"]), **kwargs)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "Policy":
        """A policy from a TOML file: top-level keys as in :meth:`from_dict`, or a
        ``[policy]`` table, with per-layer overrides as ``[layers."conv1"]`` tables."""
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        if set(data) == {"policy"}:
            data = data["policy"]
        return cls.from_dict(data)

    @classmethod
    def load(cls, spec: "Policy | str | os.PathLike[str] | Mapping[str, Any] | None") -> "Policy":
        """A policy from whatever the user holds: a Policy, a recipe string, a dict, or the
        path of a .toml file (None means float32 everywhere)."""
        if spec is None:
            return cls()
        if isinstance(spec, Policy):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith(".toml")):
            return cls.from_toml(spec)
        if isinstance(spec, str):
            return cls.parse(spec)
        raise ValueError(f"cannot build a Policy from {type(spec).__name__}; give a recipe string, dict, .toml path or Policy")

    # -- resolution ------------------------------------------------------------------------
    def for_layer(self, name: str = "") -> LayerPolicy:
        """The resolved policy of the module at path ``name``.

        Overrides are applied from the outermost path to ``name`` itself ("block",
        "block.conv1", ...), so a pattern naming a container reaches every layer inside it
        and a deeper match wins over a shallower one. At one path, matching globs apply in
        the mapping's order (later wins), then an exact name (wins over every glob).
        """
        values: dict[str, Any] = {k: getattr(self, k) for k in LAYER_KEYS}
        parts = name.split(".") if name else [""]
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            exact = None
            for pattern, over in self.layers.items():
                if pattern == path:
                    exact = over
                elif _is_glob(pattern) and fnmatch.fnmatchcase(path, pattern):
                    values.update(over)
            if exact is not None:
                values.update(exact)
        return LayerPolicy(**values, grad_reduction=self.grad_reduction, loss_scale=self.loss_scale, on_nar=self.on_nar)

    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """The ``layers`` keys that match none of the module paths ``names`` (a typo guard
        for convert)."""
        return [p for p in self.layers if not any(p == n or (_is_glob(p) and fnmatch.fnmatchcase(n, p)) for n in names)]

    def __str__(self) -> str:
        """Stages, quire and reduction always, then every other field that differs from its
        default, so that two different policies never print the same."""
        stages = " ".join(f"{s[0].upper()}={getattr(self, s) or 'float32'}" for s in STAGES)
        shown = (*STAGES, "quire", "grad_reduction", "layers")
        extra = "".join(
            f" {f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.name not in shown and getattr(self, f.name) != f.default
        )
        if self.layers:
            extra += f" layers={dict((k, dict(v)) for k, v in self.layers.items())}"
        return f"Policy({stages} quire={self.quire} reduction={self.grad_reduction}{extra})"

    def to_dict(self) -> dict[str, Any]:
        """Plain strings, numbers, bools and dicts (JSON and ``torch.load(weights_only=True)``
        safe) that :meth:`from_dict` turns back into an equal policy; formats by name."""
        name = lambda v: str(v) if isinstance(v, (Posit, Float)) else "float32" if v is None else v  # noqa: E731
        d = {f.name: name(getattr(self, f.name)) for f in fields(self) if f.name != "layers"}
        d["layers"] = {k: {kk: name(vv) for kk, vv in v.items()} for k, v in self.layers.items()}
        return d


def parse_format_or_none(text: str) -> Format | bool | None:
    """The format ``text`` names, or None when it names none (used to tell "posit8q" from
    a format name ending in q; no format name does)."""
    try:
        return parse_format(text) or True
    except ValueError:
        return None


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _refuse_letter_conflicts(d: Mapping[str, Any], what: str) -> None:
    """Raise ValueError when a stage is given both by letter and by name ("F" and "forward"):
    which one wins would depend on the order of the keys."""
    for letter, name in STAGE_LETTERS.items():
        if letter in d and name in d:
            raise ValueError(
                f"{what}: stage {name} is given twice, as {letter!r} = {d[letter]!r} and {name!r} = {d[name]!r}; keep one"
            )


def _normalise_overrides(over: Mapping[str, Any], what: str) -> dict[str, Any]:
    _refuse_letter_conflicts(over, what)
    out: dict[str, Any] = {}
    for key, value in over.items():
        key = STAGE_LETTERS.get(key, key)
        if key not in LAYER_KEYS:
            raise ValueError(f"{what}: unknown key {key!r}; allowed: {list(LAYER_KEYS)} (or F, B, G, O, L)")
        if key in STAGES:
            value = parse_format(value, f"{what}.{key}")
        elif key == "quire":
            _choice(value, QUIRE_MODES, f"{what}.quire")
        elif key == "rounding":
            _choice(value, ROUNDING_MODES, f"{what}.rounding")
        elif key == "scaling":
            _choice(value, SCALINGS, f"{what}.scaling")
        elif not isinstance(value, bool):
            raise ValueError(f"{what}.underflow must be a bool, got {value!r}")
        out[key] = value
    return out


PolicySpec = LayerPolicy | Policy | str | os.PathLike[str] | Mapping[str, Any] | None
_FLOAT_LAYER = LayerPolicy()  # Policy().for_layer(name) for every name, without building a Policy


def layer_policy(spec: PolicySpec, name: str = "") -> LayerPolicy:
    """The LayerPolicy of the module at path ``name`` from any policy spec: a LayerPolicy
    (already resolved: returned as is), None (float32 everywhere), or anything
    :meth:`Policy.load` reads (a Policy, a recipe string, a dict, a .toml path). The one
    resolver of modules and functional ops alike."""
    if isinstance(spec, LayerPolicy):
        return spec
    if spec is None:
        return _FLOAT_LAYER
    return Policy.load(spec).for_layer(name)
