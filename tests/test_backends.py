"""The backend seam: the active backend's name, forcing one by environment variable, and
a registered backend receiving the calls for its device type."""

import pytest
import torch

import positnn
from positnn import Posit, backends

P8 = Posit(8, 2)


def test_cpu_backend_is_numba():
    assert positnn.backend() == "numba"
    assert positnn.backend(torch.device("cpu")) == "numba"
    assert backends.backend_for("cpu").NAME == "numba"
    assert "numba" in backends.available()


def test_unknown_forced_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("POSITNN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"unknown positnn backend 'nope'; available: .*numba"):
        positnn.backend()
    with pytest.raises(ValueError, match="nope"):
        P8.round(torch.ones(3))


def test_forcing_numba_by_name_works(monkeypatch):
    monkeypatch.setenv("POSITNN_BACKEND", "numba")
    assert torch.equal(P8.round(torch.tensor([1.03, 3.0])), torch.tensor([1.0, 3.0]))


class _FakeBackend:
    """Records its calls and answers with a recognisable constant."""

    NAME = "fake"

    def __init__(self):
        self.calls = []

    def round_nearest(self, x, fmt, underflow):
        self.calls.append(("round_nearest", fmt, underflow))
        return torch.full(x.shape, 42.0, dtype=fmt.dtype, device=x.device)

    def add(self, a, b, fmt, device):
        self.calls.append(("add", fmt, tuple(a.shape), tuple(b.shape)))
        return torch.full(a.shape, 7.0, dtype=fmt.dtype, device=device)


@pytest.fixture
def fake(monkeypatch):
    """A fake backend registered for the "meta" device type, unregistered afterwards."""
    monkeypatch.setattr(backends, "_backends", dict(backends._backends))
    monkeypatch.setattr(backends, "_by_device", dict(backends._by_device))
    b = _FakeBackend()
    backends.register("fake", b, device_types=("meta",))
    return b


def test_registered_backend_serves_its_device_type(fake):
    assert positnn.backend("meta") == "fake"
    y = P8.round(torch.empty(2, 3, device="meta"), underflow=True)
    assert fake.calls == [("round_nearest", P8, True)]
    assert y.device.type == "meta" and y.shape == (2, 3)
    # Operands are broadcast before the backend sees them; a Python scalar joins as float64.
    P8.add(torch.empty(2, 3, device="meta"), 1.0)
    assert fake.calls[-1] == ("add", P8, (2, 3), (2, 3))


def test_cpu_tensors_do_not_reach_the_fake(fake):
    assert torch.equal(P8.round(torch.tensor([1.03])), torch.tensor([1.0]))
    assert P8.add(torch.tensor([1.0]), 2.0).item() == 3.0
    assert fake.calls == []


def test_forced_backend_serves_every_device(fake, monkeypatch):
    monkeypatch.setenv("POSITNN_BACKEND", "fake")
    assert P8.round(torch.tensor([1.03])).item() == 42.0
    assert positnn.backend() == "fake"
