import random
import zlib

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seed torch, random and numpy per test: deterministic, but different for each test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield
