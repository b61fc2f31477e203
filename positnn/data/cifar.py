"""CIFAR-10 and CIFAR-100 batches: python pickles, read by an unpickler that only builds
numpy arrays."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .catalog import NUM_CLASSES, CorruptDatasetError, _check_labels

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
