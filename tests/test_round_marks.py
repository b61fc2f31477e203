"""A stage skips rounding a tensor it produced itself (the mark), and only then."""

import pytest
import torch

from positnn import Posit
from positnn.policy import LayerPolicy, parse_format
from positnn.stage import Stage, carry_mark

P8 = Posit(8, 2)


def _stage(**kw) -> Stage:
    return Stage.of(LayerPolicy(forward=kw.pop("fmt", P8), **kw), "forward")


@pytest.fixture
def rounds(monkeypatch):
    """How many tensors reach the format's rounding kernel."""
    calls = []
    orig = Posit.round

    def spy(self, x, *a, **k):
        calls.append(x.numel())
        return orig(self, x, *a, **k)

    monkeypatch.setattr(Posit, "round", spy)
    return calls


def test_a_result_of_the_stage_is_not_rounded_again(rounds):
    S = _stage()
    y = S.mul(torch.rand(50), torch.rand(50))
    rounds.clear()
    assert S.round(y) is y
    assert S.round(y.view(5, 10)).data_ptr() == y.data_ptr()  # a view of it too
    assert rounds == []


def test_an_in_place_write_voids_the_mark(rounds):
    S = _stage()
    y = S.add(torch.rand(50), torch.rand(50))
    y.mul_(1.01)  # no longer posit(8,2) values
    expected = P8.round(y)
    rounds.clear()
    r = S.round(y)
    assert rounds == [50] and torch.equal(r, expected)
    view = r.view(5, 10)
    view[0, 0] = 0.3  # written through a view: the shared version counter moves
    expected = P8.round(r)
    rounds.clear()
    assert torch.equal(S.round(r), expected) and rounds == [50]


def test_the_mark_is_per_format_and_underflow():
    e4m3 = parse_format("fp8e4m3")
    sub = 2.0 ** -9  # a subnormal of E4M3, which underflow=True flushes
    y = _stage(fmt=e4m3).mul(torch.tensor([sub, 3.0]), torch.tensor([1.0, 1.0]))
    assert y[0] == sub
    flushed = _stage(fmt=e4m3, underflow=True).round(y)
    assert flushed[0] == 0 and torch.equal(flushed, e4m3.round(y, underflow=True))
    z = _stage().mul(torch.tensor([1.125, 3.0]), torch.tensor([1.0, 1.0]))
    p6 = _stage(fmt=Posit(6, 1)).round(z)
    assert torch.equal(p6, Posit(6, 1).round(z)) and not torch.equal(p6, z)


def test_stochastic_stages_do_not_mark(rounds):
    S = _stage(rounding="stochastic")
    y = S.round(torch.rand(20))
    rounds.clear()
    S.round(y)
    assert rounds == [20]


def test_a_detached_alias_carries_the_mark(rounds):
    S = _stage()
    y = S.sub(torch.rand(8), torch.rand(8))
    d = carry_mark(y, y.detach())
    c = carry_mark(y, y.clone())
    rounds.clear()
    assert S.round(d) is d and S.round(c) is c and rounds == []
    plain = y.clone()
    S.round(plain)
    assert rounds == [8]


def test_a_view_reinterpreting_the_bits_is_rounded():
    S = _stage()
    y = S.mul(torch.rand(8), torch.rand(8))  # float32 posit(8,2) values
    bits = y.view(torch.bfloat16)  # the same bytes read as 16 bfloat16 numbers
    r = S.round(bits)
    assert r is not bits and torch.equal(r, P8.round(bits))
