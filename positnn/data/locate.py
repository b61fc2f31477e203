"""Where data sets are looked for: the search bases, their sub-folders, and the message
that says where we looked and how to get the files."""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import _CIFAR_FILES, _IDX_FILES, _SUBDIRS, SYSTEM_DIRS, DatasetNotFoundError, _check_split, canonical_name

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


def cache_dir() -> Path:
    """Where missing data sets are downloaded to: ``$POSITNN_DATA``, else ``~/.cache/positnn``."""
    env = os.environ.get("POSITNN_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "positnn"
