"""Input validation and range edge cases: quire states, float quire modes at the extremes of
the exponent range, format and policy arguments, and the Python 3.10 TOML fallback."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import positnn.policy as policy_module
from positnn import Policy, Posit, quire
from posit_reference import decode_pattern, round_pattern

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def T(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


# ============================================================================ quire state


def _filled_quire(f: Posit = Posit(16, 2), shape=(2, 3)) -> quire.Quire:
    q = quire.Quire(f, shape)
    q.add_product(torch.full(shape, 3.0, dtype=torch.float64), torch.full(shape, -1.5, dtype=torch.float64))
    return q


@pytest.mark.parametrize(
    "key,bad,expect",
    [
        ("limbs", lambda s: s["limbs"][:, :-3], "shape"),  # truncated limbs read as zeros
        ("limbs", lambda s: s["limbs"][:1], "shape"),  # too few rows: an out-of-bounds read
        ("limbs", lambda s: s["limbs"].double(), "int64"),  # float limbs: a numba typing dump
        ("limbs", lambda s: s["limbs"].to(torch.int32), "int64"),
        ("limbs", lambda s: s["limbs"].numpy(), "int64"),
        ("format", lambda s: "posit(16,1)", "posit(16,2)"),
        ("format", lambda s: "no such format", "posit(16,2)"),
        ("shape", lambda s: [3, 2], "[2, 3]"),
    ],
)
def test_quire_load_state_dict_refuses_bad_values(key, bad, expect):
    src = _filled_quire()
    state = src.state_dict()
    state[key] = bad(state)
    q = _filled_quire()
    before = q.limbs.clone()
    with pytest.raises(ValueError) as info:
        q.load_state_dict(state)
    msg = str(info.value)
    assert repr(key) in msg and expect in msg, msg
    assert torch.equal(q.limbs, before)  # a refused load leaves the quire as it was


def test_quire_load_state_dict_refuses_bad_keys_and_corrupt_limbs():
    q = _filled_quire()
    state = q.state_dict()
    for broken in ({k: v for k, v in state.items() if k != "limbs"}, {**state, "mode": "exact"}, [1, 2]):
        with pytest.raises(ValueError, match="keys"):
            q.load_state_dict(broken)
    huge = state["limbs"].clone()
    huge[0, 0] = 1 << 62  # would overflow int64 when carried
    with pytest.raises(ValueError, match="'limbs'.*magnitude"):
        q.load_state_dict({**state, "limbs": huge})
    wide = state["limbs"].clone()
    wide[1, -1] = 5  # a value beyond the quire's width
    with pytest.raises(ValueError, match="'limbs'.*beyond"):
        q.load_state_dict({**state, "limbs": wide})
    # a sum of quires (limbs not carried) and a negative value still load and round
    s = q + q + _filled_quire()
    r = quire.Quire(q.fmt, q.shape)
    r.load_state_dict(s.state_dict())
    assert torch.equal(r.to_posit(), torch.full((2, 3), -13.5, dtype=q.fmt.dtype))


# ============================================================================ float quire modes at the extremes

# Formats whose maxpos**2 overflows the mode's float (and minpos**2 underflows it).
BEYOND = [((16, 4), "float32"), ((8, 5), "float32"), ((32, 5), "float64"), ((32, 2), "float32")]
EXTREME = BEYOND + [((16, 4), "float64")]


@pytest.mark.parametrize("fmt,mode", BEYOND, ids=[f"p{n}e{es}-{m}" for (n, es), m in BEYOND])
def test_float_modes_saturate_instead_of_nar_or_zero(fmt, mode):
    f = Posit(*fmt)
    mx, mn = f.maxpos, f.minpos
    mm = lambda a, b, **kw: quire.matmul(T(a), T(b), f, mode=mode, **kw)  # noqa: E731
    assert mm([[mx]], [[mx]]).item() == mx
    assert mm([[-mx]], [[mx]]).item() == -mx
    assert mm([[mn]], [[mn]]).item() == mn
    assert mm([[mn]], [[-mn]]).item() == -mn
    assert mm([[mn]], [[mn]], underflow=True).item() == 0.0  # minpos**2 is below minpos / useed
    assert mm([[mx, mx, mx]], [[mx], [mx], [mx]]).item() == mx
    assert mm([[mx, mn]], [[mx, 0.0], [mn, 1.0]]).tolist() == [[mx, mn]]  # rows and columns of mixed scale
    assert mm([[mx, mn]], [[0.0], [1.0]]).item() == mn  # one row spanning both ends of the range
    assert mm([[mx]], [[mx]], bias=T([-mx])).item() == mx
    assert mm([[mn]], [[mn]], bias=T([mn])).item() == mn
    x = torch.tensor([[mx, math.nan]], dtype=torch.float64)
    assert torch.isnan(mm(x, [[mx], [1.0]])).all()  # NaR still propagates
    # In range, the mode is still the plain float GEMM, then one rounding.
    dt = torch.float32 if mode == "float32" else torch.float64
    a = f.round(torch.randn(4, 40, dtype=torch.float64) * 8)
    b = f.round(torch.randn(40, 3, dtype=torch.float64) * 8)
    assert torch.equal(quire.matmul(a, b, f, mode=mode), f.round(torch.matmul(a.to(dt), b.to(dt))))


def _ref_pattern(a: np.ndarray, b: np.ndarray, n: int, es: int) -> np.ndarray:
    """Exact a @ b (Fractions), rounded once: n-bit patterns."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.int64)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            x = sum((Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(a.shape[1])), Fraction(0))
            out[i, j] = round_pattern(x, n, es)
    return out


@st.composite
def extreme_case(draw):
    (n, es), mode = draw(st.sampled_from(EXTREME))
    f = Posit(n, es)
    E = f.max_exponent
    M, K, N = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    # Exponents bunched near +-maxpos, where products leave the float's range.
    side = draw(st.sampled_from([1, -1, 0]))
    expo = st.integers(E // 2, E) if side == 1 else st.integers(-E, -E // 2) if side == -1 else st.integers(-E, E)
    def matrix(r, c):
        e = np.array(draw(st.lists(expo, min_size=r * c, max_size=r * c)), dtype=np.float64)
        m = np.array(draw(st.lists(st.floats(1.0, 2.0), min_size=r * c, max_size=r * c)))
        return f.round(T((m * np.exp2(e)).reshape(r, c))).double()  # positive posits: no cancellation
    return f, mode, matrix(M, K), matrix(K, N)


@settings(max_examples=60, deadline=None)
@given(extreme_case())
def test_float_modes_at_extreme_scales_vs_exact(case):
    """With positive posits (no cancellation) a float mode's result is never NaR and never
    0. Where the float holds a product of two posits exactly, one term gives the exact
    result and more terms a neighbour of it; otherwise (posit(32,2) in float32, whose
    operands the cast rounds) it is within the float's relative error of it."""
    f, mode, a, b = case
    got = quire.matmul(a, b, f, mode=mode)
    assert not torch.isnan(got).any() and (got > 0).all(), (got, mode)
    ref = _ref_pattern(a.numpy(), b.numpy(), f.nbits, f.es)
    pat = f.encode(got).to(torch.int64).numpy() & ((1 << f.nbits) - 1)
    K = a.shape[1]
    mantissa = 24 if mode == "float32" else 53
    if 2 * f.max_significand_bits <= mantissa:
        if K == 1:
            assert np.array_equal(pat, ref), (pat, ref)
        else:
            assert (np.abs(pat - ref) <= 1).all(), (pat, ref)
    else:
        want = np.vectorize(lambda p: float(decode_pattern(int(p), f.nbits, f.es)))(ref)
        close = np.abs(got.numpy() - want) <= want * (K + 2) * 2.0 ** (1 - mantissa)
        assert (close | (np.abs(pat - ref) <= 1)).all(), (got, want)


# ============================================================================ Posit arguments


@pytest.mark.parametrize("nbits,es", [(np.int64(8), 2), (np.int32(8), np.int8(2)), (torch.tensor(8), 2), (8, np.uint8(2))])
def test_posit_accepts_integral_numbers_only(nbits, es):
    f = Posit(nbits, es)
    assert f == Posit(8, 2) and hash(f) == hash(Posit(8, 2)) and {f: 1}[Posit(8, 2)] == 1
    assert type(f.nbits) is int and type(f.es) is int
    assert repr(f) == "Posit(8, 2)"
    for bad_n, bad_es in [(8.0, 2), (True, 2), (8, False), (np.bool_(True), 2), ("8", 2), (np.float64(8), 2), (np.int64(64), 2)]:
        with pytest.raises(ValueError, match="integer in"):
            Posit(bad_n, bad_es)


def test_parse_refuses_mismatched_brackets_and_lists_the_forms():
    for text, fmt in [("posit(8,2)", Posit(8, 2)), ("posit<8,2>", Posit(8, 2)), ("p8e2", Posit(8, 2)),
                      ("posit8_2", Posit(8, 2)), ("posit8", Posit(8, 2)), (" Posit( 16 , 1 ) ", Posit(16, 1)),
                      ("posit<16, 1>", Posit(16, 1)), ("p16es1", Posit(16, 1))]:
        assert Posit.parse(text) == fmt, text
    for text in ("posit<8,2)", "posit(8,2>", "posit[8,2]", "posit(8,2", "posit8,2>"):
        with pytest.raises(ValueError) as info:
            Posit.parse(text)
        msg = str(info.value)
        assert repr(text) in msg
        for form in ("posit(N,ES)", "posit<N,ES>", "pNeES", "positN_ES", "positN"):
            assert form in msg, (form, msg)


def test_round_validates_options_and_documents_detach():
    f = Posit(8, 2)
    x = torch.ones(3)
    for bad in ("yes", 1, None, "False"):
        with pytest.raises(ValueError) as info:
            f.round(x, underflow=bad)
        assert repr(bad) in str(info.value) and "bool" in str(info.value)
    with pytest.raises(ValueError) as info:
        f.round(x, "up")
    assert "'up'" in str(info.value) and "nearest" in str(info.value) and "stochastic" in str(info.value)
    assert torch.equal(f.round(x, underflow=np.bool_(True)), x)
    assert "detach" in Posit.round.__doc__
    y = torch.ones(2, requires_grad=True)
    assert not f.round(y * 2).requires_grad  # as documented


# ============================================================================ Policy


def test_recipe_refuses_a_stage_given_twice():
    with pytest.raises(ValueError) as info:
        Policy.parse("posit8-O16-O12")
    assert "O16" in str(info.value) and "O12" in str(info.value)
    with pytest.raises(ValueError, match="'f16'.*'F12'"):
        Policy.parse("posit8-f16-F12q")
    assert Policy.parse("posit8-O16-L16q").optimizer == Posit(16, 2)


def test_policy_dict_and_toml_refuse_letter_and_name_together(tmp_path):
    with pytest.raises(ValueError) as info:
        Policy.from_dict({"F": "posit8", "forward": "posit16"})
    assert "'F'" in str(info.value) and "'forward'" in str(info.value)
    with pytest.raises(ValueError, match="'O'.*'optimizer'"):
        Policy.from_dict({"recipe": "posit8", "O": "posit16", "optimizer": "posit12"})
    with pytest.raises(ValueError, match=r"layers\['fc'\].*'G'.*'gradient'"):
        Policy(layers={"fc": {"G": "posit8", "gradient": "posit16"}})
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nF = "posit8"\nforward = "posit16"\n')
    with pytest.raises(ValueError, match="'F'.*'forward'"):
        Policy.from_toml(path)
    assert Policy.from_dict({"F": "posit8", "optimizer": "posit16"}).forward == Posit(8, 2)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 10**400])
def test_policy_refuses_non_finite_loss_scale(scale):
    with pytest.raises(ValueError) as info:
        Policy(loss_scale=scale)
    assert repr(scale) in str(info.value) and "finite" in str(info.value)


def test_policy_str_and_repr_show_every_field_that_differs():
    changed = {
        "forward": "posit8", "backward": "posit8", "gradient": "posit8", "optimizer": "posit16",
        "loss": "posit16", "quire": "float32", "underflow": True, "rounding": "stochastic",
        "layers": {"fc": {"F": "posit8"}}, "grad_reduction": "positnn", "loss_scale": 4.0, "on_nar": "report",
        "unsupported_ops": "float", "scaling": "tensorwise",
    }
    assert set(changed) == {f.name for f in dataclasses.fields(Policy)}, "give every field a changed value"
    base = Policy()
    texts = {"default": (str(base), repr(base))}
    for name, value in changed.items():
        p = Policy(**{name: value})
        assert p != base
        assert str(p) != str(base), name
        assert repr(p) != repr(base), name
        texts[name] = (str(p), repr(p))
    assert len({s for s, _ in texts.values()}) == len(texts)  # all pairwise distinct
    assert len({r for _, r in texts.values()}) == len(texts)


# ============================================================================ Python 3.10


def test_policy_falls_back_to_tomli_without_tomllib(monkeypatch, tmp_path):
    """On Python 3.10 there is no tomllib: policy.py must import tomli instead."""
    fake_tomli = type(sys)("tomli")
    fake_tomli.load = tomllib.load
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    name = "positnn._policy_py310_probe"
    spec = importlib.util.spec_from_file_location(name, policy_module.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    assert mod.tomllib is fake_tomli
    path = tmp_path / "p.toml"
    path.write_text('recipe = "posit8-O16q"\n')
    assert mod.Policy.from_toml(path).optimizer == Posit(16, 2)


def test_pyproject_declares_tomli_for_python_310():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.10"
    deps = [d.replace(" ", "") for d in meta["dependencies"]]
    assert any(d.startswith("tomli>=") and "python_version<'3.11'" in d for d in deps), deps
