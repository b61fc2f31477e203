"""Data sets of the PositNN paper, read from their original files.

MNIST and Fashion-MNIST come as IDX files (gzip-compressed or not), CIFAR-10 and
CIFAR-100 as the python pickles of ``cifar-10-batches-py`` / ``cifar-100-python``.
Everything is loaded into memory as tensors: images float32 (N, C, H, W), already
normalised with the paper's constants, labels int64. A data set found nowhere is
downloaded, checksum-verified, into ``$POSITNN_DATA`` or ``~/.cache/positnn``.

Where the files are looked for is given by :func:`candidate_dirs`; missing files raise
:class:`DatasetNotFoundError` (a ``FileNotFoundError``) and damaged ones
:class:`CorruptDatasetError` (a ``ValueError``), both naming the file(s) concerned.

The package by part: ``catalog`` (names, constants, errors), ``idx`` and ``cifar`` (the
file readers), ``locate`` (search paths), ``download`` (fetch) and ``loading``
(:func:`load_dataset`).
"""

from .catalog import DATASETS as DATASETS
from .catalog import INPUT_SHAPE as INPUT_SHAPE
from .catalog import NORMALISATION as NORMALISATION
from .catalog import NUM_CLASSES as NUM_CLASSES
from .catalog import SPLITS as SPLITS
from .catalog import SYSTEM_DIRS as SYSTEM_DIRS
from .catalog import CorruptDatasetError as CorruptDatasetError
from .catalog import DatasetNotFoundError as DatasetNotFoundError
from .catalog import DownloadError as DownloadError
from .catalog import canonical_name as canonical_name
from .download import _SOURCES as _SOURCES
from .download import _raw_sha256 as _raw_sha256
from .download import fetch as fetch
from .idx import read_idx as read_idx
from .loading import ImageDataset as ImageDataset
from .loading import load_dataset as load_dataset
from .locate import cache_dir as cache_dir
from .locate import candidate_dirs as candidate_dirs
from .locate import find_dataset_dir as find_dataset_dir
from .text import CharCorpus as CharCorpus
from .text import load_text as load_text

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
    "CharCorpus",
    "load_text",
]
