"""IDX files (MNIST, Fashion-MNIST), gzip-compressed or not."""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from .catalog import INPUT_SHAPE, NUM_CLASSES, CorruptDatasetError, _check_labels

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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
