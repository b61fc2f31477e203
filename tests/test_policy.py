"""Policy: recipe strings, dicts, TOML, per-layer resolution, errors, maybe_round."""

import pytest
import torch

from positnn import Posit
from positnn.policy import LayerPolicy, Policy, maybe_round

P8, P12, P16 = Posit(8, 2), Posit(12, 2), Posit(16, 2)


@pytest.mark.parametrize(
    "recipe, stages, quire",
    [
        ("posit8-O16-L16q", (P8, P8, P8, P16, P16), "exact"),
        ("posit8-O12-L12q", (P8, P8, P8, P12, P12), "exact"),
        ("posit8-O16-L12q", (P8, P8, P8, P16, P12), "exact"),
        ("posit(16,1)", (Posit(16, 1),) * 5, "none"),
        ("posit(8,2)q", (P8,) * 5, "exact"),
        ("posit8q", (P8,) * 5, "exact"),
        ("posit8", (P8,) * 5, "none"),
        ("p8e0-O(16,1)-Lp16e1q", (Posit(8, 0),) * 3 + (Posit(16, 1),) * 2, "exact"),
        ("posit8-Ffloat32", (None, P8, P8, P8, P8), "none"),
        ("float32", (None,) * 5, "none"),
        ("fp32", (None,) * 5, "none"),
    ],
)
def test_recipes(recipe, stages, quire):
    p = Policy.parse(recipe)
    assert (p.forward, p.backward, p.gradient, p.optimizer, p.loss) == stages
    assert p.quire == quire
    assert p.grad_reduction == ("mean" if all(s is None for s in stages) else "positnn")


def test_python_default_is_exact_quire_and_formats_normalise():
    p = Policy(forward="posit(8,2)", backward=P8, gradient="p8e2", optimizer="posit16", loss="float32")
    assert p.quire == "exact"
    assert (p.forward, p.backward, p.gradient, p.optimizer, p.loss) == (P8, P8, P8, P16, None)
    assert Policy().grad_reduction == "mean" and p.grad_reduction == "positnn"
    assert hash(p) == hash(Policy(forward=P8, backward=P8, gradient=P8, optimizer=P16)) and p == Policy(
        forward=P8, backward=P8, gradient=P8, optimizer=P16)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"forward": "posit(99,2)"}, ["forward", "posit(99,2)"]),
        ({"quire": "fast"}, ["quire", "exact", "none"]),
        ({"rounding": "up"}, ["rounding", "stochastic"]),
        ({"grad_reduction": "sum"}, ["grad_reduction", "positnn"]),
        ({"layers": {"conv1": {"forwrd": "posit8"}}}, ["forwrd", "conv1", "forward"]),
        ({"layers": {"conv1": {"quire": "yes"}}}, ["conv1", "quire"]),
        ({"loss_scale": -1}, ["loss_scale"]),
        ({"on_nar": "ignore"}, ["on_nar", "raise"]),
    ],
)
def test_errors_name_the_bad_key_and_the_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as info:
        Policy(**kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("bad, word", [("posit8-X16q", "X16"), ("float32q", "q"), ("positx", "positx"), ("", "recipe")])
def test_bad_recipes(bad, word):
    with pytest.raises(ValueError, match=word):
        Policy.parse(bad)


def test_from_dict_with_recipe_letters_and_layers():
    p = Policy.from_dict({"recipe": "posit8-O16-L16q", "G": "posit(12,2)",
                          "layers": {"conv1": {"F": "posit(16,1)"}}})
    assert p.gradient == P12 and p.optimizer == P16 and p.quire == "exact"
    assert p.for_layer("conv1").forward == Posit(16, 1)
    with pytest.raises(ValueError, match="recipie"):
        Policy.from_dict({"recipie": "posit8"})


def test_toml_and_load(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('recipe = "posit8-O16-L16q"\nunderflow = true\n[layers."fc*"]\nforward = "posit(16,1)"\n'
                    '[layers.conv1]\nquire = "none"\n')
    p = Policy.from_toml(path)
    assert p.underflow and p.for_layer("fc2").forward == Posit(16, 1) and p.for_layer("conv1").quire == "none"
    assert Policy.load(str(path)) == p == Policy.load(path)
    assert Policy.load("posit8-O16-L16q") == Policy.parse("posit8-O16-L16q")
    assert Policy.load({"forward": "posit8"}).forward == P8
    assert Policy.load(p) is p and Policy.load(None) == Policy()
    (tmp_path / "q.toml").write_text('[policy]\nforward = "posit8"\n')
    assert Policy.load(tmp_path / "q.toml").forward == P8


def test_layer_resolution_order():
    p = Policy(forward=P8, layers={
        "*": {"backward": P12},
        "fc*": {"forward": P16},
        "fc2": {"forward": Posit(10, 1)},  # exact name beats globs at the same path
        "f?2": {"forward": Posit(9, 1)},
        "block": {"gradient": P16},  # a container reaches its children
        "block.*": {"gradient": Posit(10, 2)},  # deeper beats shallower
    })
    assert p.for_layer("fc1").forward == P16
    assert p.for_layer("fc2").forward == Posit(10, 1)
    assert p.for_layer("conv1").forward == P8 and p.for_layer("conv1").backward == P12
    assert p.for_layer("block").gradient == P16
    assert p.for_layer("block.conv").gradient == Posit(10, 2)
    lp = p.for_layer("fc1")
    assert isinstance(lp, LayerPolicy) and lp.quire == "exact" and not lp.is_float
    assert p.unmatched_patterns(["fc1", "conv1"]) == ["fc2", "f?2", "block", "block.*"]


def test_maybe_round_passes_float_through_and_rounds_posits():
    x = torch.randn(100)
    assert maybe_round(x, None) is x
    assert torch.equal(maybe_round(x, P8), P8.round(x))
    lp = LayerPolicy(forward=P8, underflow=True)
    tiny = torch.tensor([2.0**-40, 2.0**-25, -(2.0**-40)])
    assert torch.equal(maybe_round(tiny, P8, lp), P8.round(tiny, underflow=True))
    sto = LayerPolicy(rounding="stochastic")
    g = torch.Generator().manual_seed(1)
    r = maybe_round(torch.full((2000,), 1.03), P8, sto, generator=g)
    assert set(r.unique().tolist()) == {1.0, 1.125}  # posit(8,2) steps by 1/8 near 1
