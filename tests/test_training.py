"""Short training runs (slow): LeNet-5 on 5,000 MNIST images for 2 epochs.

posit8-O16-L16q must land within 2 points of float32 from the same initial weights and
batch order; posit(8,2) everywhere without a quire collapses, as the paper reports.
Run with ``pytest -m slow tests/test_training.py``.
"""

import copy
from pathlib import Path

import pytest
import torch

import positnn.nn as pnn
from positnn import optim, stats
from positnn.convert import convert
from positnn.models import lenet5

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
pytestmark = pytest.mark.slow


def _data():
    from positnn.data import load_dataset

    if not DATA.exists():
        pytest.skip(f"MNIST not found at {DATA}")
    train = load_dataset("mnist", "train", DATA)
    test = load_dataset("mnist", "test", DATA)
    return (train.images[:5000], train.labels[:5000]), (test.images[:2000], test.labels[:2000])


def _train(model, loss_fn, opt, train, epochs=2, batch=64, seed=0):
    x_all, y_all = train
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for b in range(0, len(order), batch):
            idx = order[b:b + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            opt.step()


@torch.no_grad()
def _accuracy(model, test):
    model.eval()
    x, y = test
    correct = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(y), 500))
    return 100.0 * correct / len(y)


@pytest.fixture(scope="module")
def runs():
    train, test = _data()
    torch.manual_seed(0)
    base = lenet5()
    results = {}
    model = copy.deepcopy(base)
    _train(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5), train)
    results["float32"] = (_accuracy(model, test), None)
    for recipe in ("posit8-O16-L16q", "posit(8,2)"):
        model = convert(base, recipe)
        loss_fn = pnn.CrossEntropyLoss(recipe, on_nar="report")
        _train(model, loss_fn, optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5), train)
        results[recipe] = (_accuracy(model, test), stats.total(model))
    return results


def test_posit8_O16_L16q_matches_float32(runs):
    acc_float, acc_posit = runs["float32"][0], runs["posit8-O16-L16q"][0]
    assert acc_float > 90.0
    assert abs(acc_posit - acc_float) <= 2.0, runs
    assert runs["posit8-O16-L16q"][1]["nar"] == 0


def test_posit8_everywhere_without_quire_collapses(runs):
    assert runs["posit(8,2)"][0] < runs["float32"][0] - 20.0, runs
