"""Loading a split into memory as normalised tensors, downloading it when it is missing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .catalog import NORMALISATION, NUM_CLASSES, DatasetNotFoundError, DownloadError, _check_split, canonical_name
from .cifar import _load_cifar
from .download import fetch
from .idx import _load_idx_pair
from .locate import _how_to_get, cache_dir, find_dataset_dir

class ImageDataset(TensorDataset):
    """A :class:`TensorDataset` of (image, label) that also records where it came from."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, split: str,
                 source: Path) -> None:
        super().__init__(images, labels)
        self.name = name
        self.split = split
        self.source = source
        self.num_classes = NUM_CLASSES[name]

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, {self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, source={str(self.source)!r})")


def _normalise(images: np.ndarray, canon: str) -> torch.Tensor:
    # Same float32 operations, in the same order, as torchvision's ToTensor + Normalize and
    # LibTorch's MNIST + Normalize (x / 255, - mean, / std), so inputs match bit for bit.
    # The uint8 view over the decompressed bytes is read-only; astype gives a fresh, writable
    # float32 array (uint8 -> float32 is exact) that torch can then share without a copy.
    t = torch.from_numpy(images.astype(np.float32))
    t.div_(255)
    mean, std = NORMALISATION[canon]
    shape = (1, len(mean), 1, 1)
    t.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
    t.div_(torch.tensor(std, dtype=torch.float32).view(shape))
    return t


def cache_dir() -> Path:
    """Where missing data sets are downloaded to: ``$POSITNN_DATA``, else ``~/.cache/positnn``."""
    env = os.environ.get("POSITNN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "positnn"


def _find_or_download(canon: str, split: str, data_dir: str | os.PathLike[str] | None,
                      download: bool) -> tuple[Path, list[Path]]:
    try:
        return find_dataset_dir(canon, split, data_dir)
    except DatasetNotFoundError as missing:
        if not download:
            raise
        not_found = str(missing)
    # As torchvision does, fetch from the canonical source into the cache, which is one of
    # the search bases, so the next run finds the files there without asking the network.
    dest = cache_dir()
    print(f"{canon}: not found locally; downloading it into {dest} ...", file=sys.stderr)
    try:
        fetch(canon, dest)
    except (DownloadError, OSError) as exc:
        head, _, how = not_found.partition("\nTo get it:\n")
        raise DatasetNotFoundError(
            f"{head}\nDownloading it into {dest} failed:\n  " + str(exc).replace("\n", "\n  ") +
            f"\nTo get it:\n{how or _how_to_get(canon)}") from None
    return find_dataset_dir(canon, split, data_dir)


def load_dataset(name: str, split: str = "train",
                 data_dir: str | os.PathLike[str] | None = None,
                 download: bool = True) -> ImageDataset:
    """Load ``split`` ("train" or "test") of data set ``name`` fully into memory.

    ``name`` is "mnist", "fashion-mnist", "cifar10" or "cifar100" (case-insensitive, with
    the aliases of :func:`canonical_name`). The files are looked for as described in
    :func:`candidate_dirs`, starting with ``data_dir``. Returns an :class:`ImageDataset`
    (a ``TensorDataset``) of float32 images of shape (N, C, H, W), normalised with
    :data:`NORMALISATION`, and int64 labels.

    When the files are in none of those places and ``download`` is true, the data set is
    fetched from its canonical source into :func:`cache_dir` (checksum-verified, written
    atomically; see :func:`fetch`). Raises ``ValueError`` for an unknown name or split,
    :class:`DatasetNotFoundError` when the files are nowhere to be found and cannot be
    downloaded (the message lists every place looked in, the download error and the
    commands that get the data), and :class:`CorruptDatasetError` when a file is damaged.
    """
    canon = canonical_name(name)
    split = _check_split(split)
    directory, files = _find_or_download(canon, split, data_dir, download)
    if canon in ("mnist", "fashion-mnist"):
        images, labels = _load_idx_pair(canon, files[0], files[1])
    else:
        images, labels = _load_cifar(canon, files)
    return ImageDataset(_normalise(images, canon),
                        torch.from_numpy(labels.astype(np.int64)), canon, split, directory)
