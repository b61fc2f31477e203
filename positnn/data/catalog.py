"""The catalogue of data sets: names and aliases, shapes, classes, normalisation, the
files each split needs and where they are usually installed; the errors; label checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "cifar100")
SPLITS: tuple[str, ...] = ("train", "test")

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
}

# The constants of the paper's code (hpc-ulisboa/posit-neuralnet examples). Note that the
# Fashion-MNIST std 0.3300 is what PositNN uses, although the data's own std is about 0.353:
# normalised Fashion-MNIST therefore has std ~1.07, not 1. Kept as is to match the paper.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3300,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
NUM_CLASSES: dict[str, int] = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
INPUT_SHAPE: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
}

# Files each split needs. IDX names are given without ".gz": both forms are accepted.
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {
    "cifar10": {
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    },
    "cifar100": {"train": ("train",), "test": ("test",)},
}

# Sub-folders of a base directory where each data set may live: our own names first, then
# torchvision's layout (<root>/MNIST/raw, <root>/FashionMNIST/raw, <root>/cifar-10-batches-py).
_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
    "cifar100": ("cifar-100-python", "cifar100/cifar-100-python", "cifar100"),
}
# Where system packages install them (Debian: apt-get install dataset-fashion-mnist).
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": (),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "cifar10": (),
    "cifar100": (),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are in none of the places searched."""


class CorruptDatasetError(ValueError):
    """A data set file exists but cannot be decoded or has inconsistent content."""


class DownloadError(OSError):
    """Fetching a data set failed (network unreachable, HTTP error, bad checksum)."""


def canonical_name(name: str) -> str:
    """Return the canonical data set name ("mnist", "fashion-mnist", "cifar10", "cifar100").

    Matching is case-insensitive and accepts the usual spellings ("fashion_mnist", "fmnist",
    "cifar-10", ...). Raises ``ValueError`` listing the allowed names for anything else.
    """
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)} "
                         f"(also accepted: {', '.join(sorted(set(_ALIASES) - set(DATASETS)))})")
    return _ALIASES[key]


def _check_split(split: str) -> str:
    key = str(split).strip().lower()
    if key not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return key


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CorruptDatasetError(f"{path}: labels out of range [0, {num_classes}): "
                                  f"min {int(labels.min())}, max {int(labels.max())}")
