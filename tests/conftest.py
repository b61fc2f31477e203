import random
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Small real MNIST / Fashion-MNIST subsets in the original layout, committed with the tests
# (rebuilt by tests/fixtures/make_fixtures.py), so that nothing outside the repository is
# needed for the ordinary test run.
FIXTURES = REPO / "tests" / "fixtures"
# The full data sets, where a machine keeps them beside the repository: only the tests that
# need all 70,000 images read them, and only those skip when they are absent.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seed torch, random and numpy per test: deterministic, but different for each test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """load_dataset downloads missing data sets: tests must never reach the network (nor
    fill a cache), so every download fails fast unless a test serves its own files."""
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "network disabled in the test suite"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)


@pytest.fixture
def mnist_dir() -> Path:
    """The MNIST fixture: 256 training and 128 test images of the real set."""
    return FIXTURES / "mnist"


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST fixture: 64 training and 32 test images of the real set."""
    return FIXTURES / "fashion-mnist"
