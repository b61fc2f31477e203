"""Float formats in policies and stages: recipes, subformats, per-tensor scaling, modules
and checkpoints with fp8/fp16/bf16 stages."""
from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import float_reference as ref
from positnn import Float, Policy, Posit, convert, quire
from positnn.models import lenet5
from positnn.rounding import is_subformat, scale_exponent, scaled_round
from positnn.stage import Stage

E4M3, E5M2, FP16, BF16 = (Float.parse(n) for n in ("fp8e4m3", "fp8e5m2", "fp16", "bf16"))
P8, P16 = Posit(8, 2), Posit(16, 2)


@pytest.mark.parametrize(
    "recipe, stages, quire_mode",
    [
        ("fp8e4m3-Bfp8e5m2-Gfp8e5m2-O16-L16q", (E4M3, E5M2, E5M2, P16, P16), "exact"),
        ("fp8e4m3-Bfp8e5m2-Gfp8e5m2-Ofp16-Lfp16q", (E4M3, E5M2, E5M2, FP16, FP16), "exact"),
        ("fp8e4m3-Bfp8e5m2-Gfp8e5m2-Obf16-Lbf16", (E4M3, E5M2, E5M2, BF16, BF16), "none"),
        ("posit8-Ffp8e4m3-Le5m10q", (E4M3, P8, P8, P8, FP16), "exact"),
        ("bf16q", (BF16,) * 5, "exact"),
        ("float(4,3)-Ofloat32", (Float(4, 3),) * 3 + (None, Float(4, 3)), "none"),
    ],
)
def test_float_recipes(recipe, stages, quire_mode):
    p = Policy.parse(recipe)
    assert (p.forward, p.backward, p.gradient, p.optimizer, p.loss) == stages
    assert p.quire == quire_mode and p.grad_reduction == "positnn"
    assert Policy.from_dict(p.to_dict()) == p  # formats by name, back to equal values


def test_per_layer_float_overrides():
    """Floats and posits mix per layer, by name or glob, and the override reaches the ops."""
    p = Policy.parse("fp8e4m3-Bfp8e5m2-Gfp8e5m2-O16-L16q")
    p = Policy.from_dict(p.to_dict() | {"layers": {"fc*": {"F": "bf16", "scaling": "tensorwise"}, "conv1": {"B": "posit8"}}})
    fc, conv = p.for_layer("fc3"), p.for_layer("conv1")
    assert (fc.forward, fc.backward, fc.scaling) == (BF16, E5M2, "tensorwise")
    assert (conv.forward, conv.backward, conv.scaling) == (E4M3, P8, "none")
    assert Stage.of(fc, "forward").fmt == BF16 and Policy.from_dict(p.to_dict()) == p


def test_bad_float_names_list_the_float_forms():
    with pytest.raises(ValueError) as info:
        Policy.parse("fp8e4m3-Bfp9e9m9q")
    assert "stage B" in str(info.value) and "fp8e5m2" in str(info.value) and "float(5,10)" in str(info.value)
    with pytest.raises(ValueError, match="scaling"):
        Policy(forward=E4M3, scaling="rowwise")
    with pytest.raises(ValueError, match="scaling"):
        Policy(forward=E4M3, layers={"fc1": {"scaling": "columnwise"}})


SMALL = [E4M3, E5M2, Float(3, 2), Float(2, 1), Float(4, 3, subnormals=False), Float(5, 2, specials="ieee"),
         Float(3, 3), FP16, BF16, Posit(8, 2), Posit(6, 1)]


@pytest.mark.parametrize("outer", SMALL, ids=str)
def test_includes_only_what_rounds_exactly(outer):
    """is_subformat(inner, outer) is True only when rounding every value of inner to outer
    is the identity (checked on all values), and it is True for the pairs the FP8 recipes
    meet (E4M3 and E5M2 inside fp16 and bf16)."""
    for inner in SMALL:
        v = inner.values().double()
        v = v[~v.isnan()]
        exact = bool((outer.round(v).double() == v).all())
        if is_subformat(inner, outer):
            assert exact, (inner, outer)
    assert is_subformat(E4M3, FP16) and is_subformat(E5M2, FP16) and is_subformat(E4M3, BF16)
    assert is_subformat(E5M2, BF16) and not is_subformat(FP16, BF16) and not is_subformat(E5M2, E4M3)
    assert not is_subformat(E4M3, P16) and not is_subformat(P8, FP16)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([E4M3, E5M2, P8]), st.floats(-40, 40), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_scaled_round_is_the_fraction_rounding_of_the_scaled_tensor(fmt, log_amax, n, seed):
    """k puts amax(|x|) * 2**k in the top binade below max, and scaled_round(x) is
    round(x * 2**k) / 2**k elementwise (Fraction reference for floats; for posits the
    format's own round, which its oracle suites check)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 2.0**log_amax).float()
    k = scale_exponent(x, fmt)
    amax = float(x.abs().max())
    if amax > 0:
        assert math.ldexp(amax, k) <= fmt.maxpos < math.ldexp(amax, k + 1)
    got = scaled_round(x, fmt)
    assert got.dtype == x.dtype
    if isinstance(fmt, Float):
        s = ref.Spec(fmt.exp_bits, fmt.man_bits, fmt.subnormals, fmt.specials == "fn", fmt.overflow)
        exp = [ref.round_exact(Fraction(v) * Fraction(2) ** k, s) * 2.0**-k for v in x.double().tolist()]
    else:
        exp = (fmt.round(x.double() * 2.0**k).double() * 2.0**-k).tolist()
    assert got.double().tolist() == exp
    # The largest element never saturates, and what survives unscaled rounding survives.
    plain = fmt.round(x.double()).double()
    assert bool(((plain != 0) <= (got != 0)).all())


def test_scaling_leaves_zero_and_nonfinite_tensors_unscaled():
    for x in (torch.zeros(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 2.0]), torch.zeros(0)):
        assert scale_exponent(x, E4M3) == 0
    assert scaled_round(torch.tensor([1.0, 2.0]), None).tolist() == [1.0, 2.0]  # a float stage


def test_stage_scales_dot_product_operands_only():
    """A tensorwise stage rounds the operands of linear (and matmul, conv) under their own
    scales, then rounds the exact result once, unscaled; element-wise ops are unchanged."""
    lp = Policy(forward=E4M3, scaling="tensorwise").for_layer("")
    S, plain = Stage.of(lp, "forward"), Stage.of(Policy(forward=E4M3).for_layer(""), "forward")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 30, generator=g) * 1e-3, torch.randn(5, 30, generator=g) * 20
    exp = quire.linear(scaled_round(x, E4M3), scaled_round(w, E4M3), None, E4M3)
    assert torch.equal(S.linear(x, w), exp)
    assert not torch.equal(plain.linear(x, w), exp)  # unscaled, most of x flushes to 0
    assert torch.equal(S.add(x, x), plain.add(x, x))


@pytest.mark.parametrize("recipe", ["fp8e4m3-Bfp8e5m2-Gfp8e5m2-Ofp16-Lfp16q", "fp8e4m3-Bfp8e5m2-Gfp8e5m2-Obf16-Lbf16q",
                                    "fp8e4m3-Bfp8e5m2-Gfp8e5m2-O16-L16q"])
@pytest.mark.parametrize("scaling", ["none", "tensorwise"])
def test_lenet_steps_keep_every_stage_in_its_format(recipe, scaling):
    """A few SGD steps of LeNet-5: masters and their .grad stay O values, the F copies of
    the weights are E4M3 values (times a power of two when scaled), the loss falls, and
    the checkpoint (torch's float16/bfloat16 storage, or posit patterns) loads bit-exactly."""
    from positnn.optim import SGD
    import positnn.nn as pnn

    torch.manual_seed(0)
    policy = Policy.from_dict({"recipe": recipe, "scaling": scaling})
    model = convert(lenet5(), policy)
    opt = SGD(model.parameters(), lr=1 / 16, momentum=0.5)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    lossf = pnn.CrossEntropyLoss(policy)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    O = policy.optimizer
    for p in model.parameters():
        assert torch.equal(O.round(p.detach()).to(p.dtype), p.detach())
        assert p.grad is not None and torch.equal(O.round(p.grad).to(p.dtype), p.grad)
    fc = model.fc1 if hasattr(model, "fc1") else next(m for m in model.modules() if isinstance(m, pnn.Linear))
    wf = fc._copy("weight", "forward")
    k = scale_exponent(fc.weight.detach(), E4M3) if scaling == "tensorwise" else 0
    assert torch.equal(E4M3.round(wf.double() * 2.0**k).double(), wf.double() * 2.0**k)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = convert(lenet5(), policy)
    fresh.load_state_dict(state)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a.detach(), b.detach())


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([E4M3, E5M2, FP16, BF16]), st.data())
def test_float_fam_is_the_sum_times_c_rounded_once_when_the_sum_is_on_its_grid(fmt, data):
    """Float.fam (PositNN's fam_corrected steps with the float's mantissa width; the
    cross-entropy's target-class gradient) against the Fraction reference: whenever a + b
    is a multiple of the alignment grid 2**(top - man_bits - 3), the result is
    (a + b) * c rounded once."""
    v = finite_values_of(fmt)
    a, b, c = (float(v[data.draw(st.integers(0, len(v) - 1))]) for _ in range(3))
    got = float(fmt.fam(torch.tensor([a]), torch.tensor([b]), torch.tensor([c]))[0])
    big = max(abs(a), abs(b))
    s = ref.Spec(fmt.exp_bits, fmt.man_bits, fmt.subnormals, fmt.specials == "fn", fmt.overflow)
    exact = (Fraction(a) + Fraction(b)) * Fraction(c)
    if big == 0 or exact == 0:
        assert got == 0
        return
    unit = Fraction(2) ** (math.frexp(big)[1] - 1 - fmt.man_bits - 3)
    if ((Fraction(a) + Fraction(b)) / unit).denominator == 1:
        assert got == ref.round_exact(exact, s)


def finite_values_of(fmt):
    if fmt.nbits <= 8:
        v = fmt.values().double()
    else:  # a spread of values: float(e, 4) values are values of fp16 and bf16
        v = Float(fmt.exp_bits, 4).values().double()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("scaling", ["none", "tensorwise"])
def test_any_model_engine_trains_in_float_stages(scaling):
    """A model with no positnn layer of its own (LayerNorm, GELU: the engine) trains with
    fp8 F/B/G and bf16 O/L, with torch's loss and positnn's AdamW; masters stay bf16."""
    import torch.nn as nn
    import torch.nn.functional as TF
    from positnn.optim import AdamW

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    policy = Policy.from_dict({"recipe": "fp8e4m3-Bfp8e5m2-Gfp8e5m2-Obf16-Lbf16q", "scaling": scaling})
    model = convert(model, policy)
    opt = AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    for p in model.parameters():
        assert torch.equal(BF16.round(p.detach()).to(p.dtype), p.detach())
