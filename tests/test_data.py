"""Tests for positnn.data: real MNIST / Fashion-MNIST files, small fixtures in the original
layouts (CIFAR pickles, IDX, torchvision folders), discovery, and error reporting."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from positnn import data
from positnn.data import (
    INPUT_SHAPE,
    NORMALISATION,
    NUM_CLASSES,
    CorruptDatasetError,
    DatasetNotFoundError,
    DownloadError,
    candidate_dirs,
    fetch,
    load_dataset,
    read_idx,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POSITNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Keep the user's real ~/.cache/positnn and $POSITNN_DATA out of every test."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("POSITNN_DATA", raising=False)
    return home


# --------------------------------------------------------------------------- fixture writers


def idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    if arr.dtype.itemsize > 1:
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    return header + arr.tobytes()


def write_mnist(folder: Path, n_train: int = 5, n_test: int = 3, gz: bool = True, seed: int = 0,
                gz_names: bool | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny MNIST-layout data set; ``gz`` compresses, ``gz_names`` adds ``.gz``."""
    gz_names = gz if gz_names is None else gz_names
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labs)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz_names else "")
            (folder / name).write_bytes(gzip.compress(raw) if gz else raw)
        out[split] = (imgs, labs)
    return out


def write_cifar(folder: Path, kind: str = "cifar10", per_batch: int = 2, seed: int = 0,
                py2_names: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny CIFAR in the original pickle layout; ``py2_names`` renames numpy._core to
    numpy.core in the pickle, as in the original Python 2 files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        key, ncls = b"labels", 10
    else:
        files = {"train": ["train"], "test": ["test"]}
        key, ncls = b"fine_labels", 100
    out = {}
    for split, names in files.items():
        datas, labels = [], []
        for fname in names:
            d = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            lab = [int(v) for v in rng.integers(0, ncls, size=per_batch)]
            obj = {b"batch_label": b"fixture", b"data": d, key: lab,
                   b"filenames": [b"x.png"] * per_batch}
            if kind == "cifar100":
                obj[b"coarse_labels"] = [v // 5 for v in lab]
            blob = pickle.dumps(obj, protocol=2)
            if py2_names:
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            (folder / fname).write_bytes(blob)
            datas.append(d)
            labels.extend(lab)
        out[split] = (np.concatenate(datas), np.array(labels))
    return out


def denormalise(images: torch.Tensor, name: str) -> np.ndarray:
    mean, std = NORMALISATION[name]
    shape = (1, len(mean), 1, 1)
    x = images.double() * torch.tensor(std, dtype=torch.float64).view(shape) \
        + torch.tensor(mean, dtype=torch.float64).view(shape)
    return torch.round(x * 255).to(torch.int64).numpy()


# --------------------------------------------------------------------------- real files


def _real_dir(name: str) -> Path:
    d = SHARED_DATA / name
    if not d.is_dir():
        pytest.skip(f"real {name} files not available at {d} (set POSITNN_SHARED_DATA)")
    return d


_REAL_CACHE: dict[tuple[str, str], data.ImageDataset] = {}


def real(name: str, split: str) -> data.ImageDataset:
    _real_dir(name)
    if (name, split) not in _REAL_CACHE:
        # The base folder: the loader must pick its `mnist` / `fashion-mnist` sub-folder.
        _REAL_CACHE[(name, split)] = load_dataset(name, split, data_dir=SHARED_DATA)
    return _REAL_CACHE[(name, split)]


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("split,n", [("train", 60_000), ("test", 10_000)])
def test_real_idx_shapes_dtypes_labels(name, split, n):
    ds = real(name, split)
    assert len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.bincount(ds.labels).min() > n // 20  # every class well represented
    assert ds.source == SHARED_DATA / name
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.int64


def test_real_mnist_train_normalised_to_zero_mean_unit_std():
    x = real("mnist", "train").images
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 1.0) < 0.02


def test_real_fashion_mnist_normalised_with_the_papers_constants():
    # The paper's std 0.3300 is not the data's own std (~0.3530): the normalised std is
    # ~1.07 by design (it is what PositNN trained on). Mean is centred as usual.
    x = real("fashion-mnist", "train").images
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 0.3530 / 0.3300) < 0.02


def test_real_pixels_match_raw_file():
    ds = real("mnist", "test")
    raw = read_idx(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10_000, 28, 28) and raw.dtype == np.uint8
    assert np.array_equal(denormalise(ds.images[:50], "mnist")[:, 0], raw[:50])
    labels = read_idx(SHARED_DATA / "mnist" / "t10k-labels-idx1-ubyte.gz")
    assert np.array_equal(ds.labels.numpy(), labels.astype(np.int64))


def test_real_dir_given_directly():
    d = _real_dir("fashion-mnist")
    ds = load_dataset("FMNIST", "test", data_dir=d)
    assert ds.name == "fashion-mnist" and len(ds) == 10_000


# --------------------------------------------------------------------------- constants, names


def test_constants():
    assert NORMALISATION["mnist"] == ((0.1307,), (0.3081,))
    assert NORMALISATION["fashion-mnist"] == ((0.2860,), (0.3300,))
    assert NORMALISATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    assert NORMALISATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert NUM_CLASSES == {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
    assert INPUT_SHAPE["mnist"] == (1, 28, 28) and INPUT_SHAPE["cifar100"] == (3, 32, 32)


@pytest.mark.parametrize("alias,canon", [("MNIST", "mnist"), ("Fashion-MNIST", "fashion-mnist"),
                                         ("fashion_mnist", "fashion-mnist"),
                                         ("fmnist", "fashion-mnist"), ("CIFAR10", "cifar10"),
                                         ("cifar-100", "cifar100")])
def test_aliases(alias, canon):
    assert data.canonical_name(alias) == canon


def test_unknown_name_or_split(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10, cifar100"):
        load_dataset("imagenet", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("mnist", "validation", data_dir=tmp_path)


# --------------------------------------------------------------------------- fixtures: CIFAR


@pytest.mark.parametrize("py2_names", [False, True])
def test_cifar10_fixture_pixel_exact(tmp_path, py2_names):
    truth = write_cifar(tmp_path / "cifar-10-batches-py", "cifar10", py2_names=py2_names)
    for split, n in (("train", 10), ("test", 2)):
        ds = load_dataset("cifar10", split, data_dir=tmp_path)
        raw, labels = truth[split]
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.float32
        assert ds.labels.dtype == torch.int64
        assert np.array_equal(ds.labels.numpy(), labels)
        pix = denormalise(ds.images, "cifar10")
        # Row layout: 1024 red values, then 1024 green, then 1024 blue, each 32x32 row-major.
        assert np.array_equal(pix[:, 0], raw[:, :1024].reshape(n, 32, 32))
        assert np.array_equal(pix[:, 1], raw[:, 1024:2048].reshape(n, 32, 32))
        assert np.array_equal(pix[:, 2], raw[:, 2048:].reshape(n, 32, 32))
        assert pix[1, 2, 3, 4] == raw[1, 2048 + 3 * 32 + 4]


def test_cifar_normalisation_values(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, "cifar10")
    # A test image whose R, G, B planes are constant 0, 128, 255.
    d = np.zeros((1, 3072), np.uint8)
    d[0, 1024:2048], d[0, 2048:] = 128, 255
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": d, b"labels": [3]}, protocol=2))
    x = load_dataset("cifar10", "test", data_dir=tmp_path).images[0]
    (m_r, m_g, m_b), (s_r, s_g, s_b) = NORMALISATION["cifar10"]
    expect = [(0 - m_r) / s_r, (128 / 255 - m_g) / s_g, (1 - m_b) / s_b]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((32, 32), expect[c]), atol=1e-6)


def test_cifar100_fixture_fine_labels(tmp_path):
    truth = write_cifar(tmp_path / "cifar-100-python", "cifar100", per_batch=4)
    ds = load_dataset("CIFAR100", "train", data_dir=tmp_path)
    raw, labels = truth["train"]
    assert ds.images.shape == (4, 3, 32, 32)
    assert np.array_equal(ds.labels.numpy(), labels)
    assert np.array_equal(denormalise(ds.images, "cifar100").reshape(4, -1), raw)
    assert ds.num_classes == 100
    assert len(load_dataset("cifar100", "test", data_dir=tmp_path / "cifar-100-python")) == 4


# --------------------------------------------------------------------------- fixtures: IDX


def test_uncompressed_idx_files(tmp_path):
    truth = write_mnist(tmp_path, gz=False)
    ds = load_dataset("mnist", "train", data_dir=tmp_path)
    imgs, labs = truth["train"]
    assert np.array_equal(denormalise(ds.images, "mnist")[:, 0], imgs)
    assert np.array_equal(ds.labels.numpy(), labs)


def test_gzip_detected_by_magic_not_extension(tmp_path):
    # gzip content under the plain name, and plain content under a .gz name.
    truth = write_mnist(tmp_path / "a", gz=True, gz_names=False)
    assert np.array_equal(read_idx(tmp_path / "a" / "t10k-labels-idx1-ubyte"), truth["test"][1])
    write_mnist(tmp_path / "b", gz=False, gz_names=True)
    assert read_idx(tmp_path / "b" / "t10k-images-idx3-ubyte.gz").shape == (3, 28, 28)
    assert len(load_dataset("mnist", "test", data_dir=tmp_path / "a")) == 3


def test_read_idx_multibyte_types(tmp_path):
    for arr in (np.arange(-6, 6, dtype=">i4").reshape(3, 4), np.linspace(-1, 1, 5, dtype=">f4"),
                np.array([[1.5, -2.25]], dtype=">f8"), np.arange(-3, 3, dtype=np.int8)):
        p = tmp_path / "x.idx"
        p.write_bytes(idx_bytes(arr))
        got = read_idx(p)
        assert got.shape == arr.shape and got.dtype.isnative
        assert np.array_equal(got, arr)


def test_torchvision_raw_layout(tmp_path):
    truth = write_mnist(tmp_path / "MNIST" / "raw", seed=1)
    write_mnist(tmp_path / "FashionMNIST" / "raw", seed=2)
    ds = load_dataset("mnist", "test", data_dir=tmp_path)
    assert ds.source == tmp_path / "MNIST" / "raw"
    assert np.array_equal(ds.labels.numpy(), truth["test"][1])
    assert load_dataset("fashion_mnist", "test", data_dir=tmp_path).source == \
        tmp_path / "FashionMNIST" / "raw"


def test_positnn_data_env_discovery(tmp_path, monkeypatch):
    base = tmp_path / "env"
    truth = write_mnist(base / "mnist", seed=3)
    monkeypatch.setenv("POSITNN_DATA", str(base))
    ds = load_dataset("mnist", "train")
    assert ds.source == base / "mnist"
    assert np.array_equal(ds.labels.numpy(), truth["train"][1])


def test_home_cache_discovery(isolated_home):
    truth = write_mnist(isolated_home / ".cache" / "positnn" / "fashion-mnist", seed=4)
    ds = load_dataset("fashion-mnist", "test")
    assert np.array_equal(ds.labels.numpy(), truth["test"][1])


def test_search_order(tmp_path, monkeypatch, isolated_home):
    arg, env = tmp_path / "arg", tmp_path / "env"
    monkeypatch.setenv("POSITNN_DATA", str(env))
    dirs = candidate_dirs("mnist", arg)
    pos = {d: i for i, d in enumerate(dirs)}
    cache = isolated_home / ".cache" / "positnn"
    assert pos[arg / "mnist"] < pos[arg] < pos[env / "mnist"] < pos[env] < pos[cache / "mnist"]
    assert pos[arg / "MNIST" / "raw"] < pos[arg]
    assert pos[cache] == len(dirs) - 1
    fdirs = candidate_dirs("fmnist", str(arg))
    assert fdirs[-1] == Path("/usr/share/datasets/fashion-mnist")
    assert arg / "FashionMNIST" / "raw" in fdirs and arg / "fashion-mnist" in fdirs
    assert tmp_path / "cifar-10-batches-py" in candidate_dirs("cifar10", tmp_path)
    assert len(set(candidate_dirs("mnist", cache))) == len(candidate_dirs("mnist", cache))
    # data_dir wins over $POSITNN_DATA when both hold the files
    a = write_mnist(arg, seed=5)
    write_mnist(env, seed=6)
    assert np.array_equal(load_dataset("mnist", "test", arg).labels.numpy(), a["test"][1])


def test_sub_folders_keep_data_sets_apart(tmp_path):
    m = write_mnist(tmp_path / "mnist", seed=7)
    f = write_mnist(tmp_path / "fashion-mnist", seed=8)
    assert np.array_equal(load_dataset("mnist", "test", tmp_path).labels.numpy(), m["test"][1])
    assert np.array_equal(load_dataset("fmnist", "test", tmp_path).labels.numpy(), f["test"][1])


# --------------------------------------------------------------------------- missing files


def test_missing_files_lists_every_place(tmp_path, monkeypatch, isolated_home):
    monkeypatch.setenv("POSITNN_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    for d in candidate_dirs("mnist", tmp_path / "nowhere"):
        assert str(d) in msg
    assert "positnn data fetch mnist" in msg and "--data-dir" in msg and "POSITNN_DATA" in msg


def test_missing_fashion_mentions_apt(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert "/usr/share/datasets/fashion-mnist" in str(info.value)


def test_partial_files_are_reported(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte\)"):
        load_dataset("mnist", "test", data_dir=tmp_path)
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing data_batch_4"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- corrupt files


def _corrupt(path: Path, fn) -> None:
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(fn(raw)))


@pytest.mark.parametrize("case,fname,change,pattern", [
    ("bad magic", "train-images-idx3-ubyte.gz", lambda b: b"\x00\x00\x07\x03" + b[4:],
     "bad IDX magic"),
    ("not idx", "train-labels-idx1-ubyte.gz", lambda b: b"hello world", "bad IDX magic"),
    ("truncated images", "train-images-idx3-ubyte.gz", lambda b: b[:-100], "truncated"),
    ("truncated header", "train-images-idx3-ubyte.gz", lambda b: b[:9], "truncated IDX header"),
    ("trailing bytes", "train-labels-idx1-ubyte.gz", lambda b: b + b"\x01\x02", "unexpected bytes"),
    ("count mismatch", "train-labels-idx1-ubyte.gz",
     lambda b: b[:4] + (4).to_bytes(4, "big") + b[8:-1], "5 images but .* 4 labels"),
    ("label out of range", "train-labels-idx1-ubyte.gz", lambda b: b[:-1] + b"\x0b",
     r"labels out of range \[0, 10\)"),
    ("wrong image size", "train-images-idx3-ubyte.gz",
     lambda b: b[:8] + (14).to_bytes(4, "big") + (56).to_bytes(4, "big") + b[16:],
     r"shape \(N, 28, 28\)"),
])
def test_corrupt_idx(tmp_path, case, fname, change, pattern):
    write_mnist(tmp_path)
    _corrupt(tmp_path / fname, change)
    with pytest.raises(CorruptDatasetError, match=pattern) as info:
        load_dataset("mnist", "train", data_dir=tmp_path)
    assert isinstance(info.value, ValueError)
    assert fname in str(info.value)


def test_damaged_gzip(tmp_path):
    write_mnist(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CorruptDatasetError, match="t10k-images-idx3-ubyte.gz: damaged gzip"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def _cifar_case(folder: Path, fname: str, blob: bytes) -> None:
    write_cifar(folder)
    (folder / fname).write_bytes(blob)


@pytest.mark.parametrize("blob,pattern", ids=["garbage", "empty", "list", "no labels", "size",
                                             "count", "range"], argvalues=[
    (b"\x80\x02garbage that is not a pickle", "not a readable CIFAR pickle"),
    (b"", "not a readable CIFAR pickle"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "no 'labels' entry"),
    (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, protocol=2),
     r"\(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2),
     "2 images but 1 labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2),
     "labels out of range"),
])
def test_corrupt_cifar(tmp_path, blob, pattern):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar_case(folder, "data_batch_3", blob)
    with pytest.raises(CorruptDatasetError, match=pattern) as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert str(folder / "data_batch_3") in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, "cifar100")
    (folder / "test").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(CorruptDatasetError, match="refusing to load global"):
        load_dataset("cifar100", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------- fetch (offline)


def test_fetch_unreachable_network_gives_clean_error(tmp_path, monkeypatch):
    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(DownloadError, match="Network is unreachable") as info:
        fetch("mnist", tmp_path)
    msg = str(info.value)
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg
    assert isinstance(info.value, OSError)
    assert list((tmp_path / "mnist").iterdir()) == []  # no partial files left behind


def _serve(monkeypatch, payloads: dict[str, bytes]) -> list[str]:
    asked: list[str] = []

    def fake_urlopen(url, *args, **kwargs):
        asked.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in payloads:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(payloads[name])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return asked


def test_fetch_rejects_bad_checksum(tmp_path, monkeypatch):
    _serve(monkeypatch, {"cifar-10-python.tar.gz": b"not the archive"})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch("cifar10", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_mnist_and_cifar_offline(tmp_path, monkeypatch):
    # Serve fixture files in place of the real downloads, with their checksums patched in,
    # to exercise the download / verify / atomic-write / unpack path without a network.
    src = tmp_path / "src"
    truth = write_mnist(src, seed=9)
    payloads = {p.name: p.read_bytes() for p in src.iterdir()}
    cifar_truth = write_cifar(src / "cifar-10-batches-py", seed=10)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    payloads["cifar-10-python.tar.gz"] = buf.getvalue()
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()}
    monkeypatch.setitem(data._SOURCES["mnist"], "files",
                        {k: md5[k] for k in data._SOURCES["mnist"]["files"]})
    monkeypatch.setitem(data._SOURCES["mnist"], "raw_sha256",
                        {k: hashlib.sha256(gzip.decompress(payloads[k])).hexdigest()
                         for k in data._SOURCES["mnist"]["files"]})
    monkeypatch.setitem(data._SOURCES["cifar10"], "files",
                        {"cifar-10-python.tar.gz": md5["cifar-10-python.tar.gz"]})
    asked = _serve(monkeypatch, payloads)

    dest = tmp_path / "cache"
    assert fetch("mnist", dest) == dest / "mnist"
    assert len(asked) == 4
    assert np.array_equal(load_dataset("mnist", "test", dest).labels.numpy(), truth["test"][1])
    fetch("mnist", dest)  # already there and verified: nothing downloaded again
    assert len(asked) == 4

    assert fetch("cifar10", dest) == dest / "cifar-10-batches-py"
    ds = load_dataset("cifar10", "train", dest)
    assert np.array_equal(ds.labels.numpy(), cifar_truth["train"][1])
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-batches-py", "mnist"]


# --------------------------------------------------------------------------- committed fixtures


@pytest.mark.parametrize("name,n_train,n_test", [("mnist", 256, 128), ("fashion-mnist", 64, 32)])
def test_repo_fixtures_load_like_the_real_sets(name, n_train, n_test, mnist_dir, fashion_mnist_dir):
    folder = {"mnist": mnist_dir, "fashion-mnist": fashion_mnist_dir}[name]
    for split, n in (("train", n_train), ("test", n_test)):
        ds = load_dataset(name, split, folder)  # the ordinary path: no special case for fixtures
        assert len(ds) == n and ds.images.shape[1:] == (1, 28, 28) and ds.source == folder
        assert len(torch.unique(ds.labels)) == 10
    # The parent folder works as a base too, each set resolved to its own sub-folder.
    assert load_dataset(name, "test", folder.parent).source == folder
    if (SHARED_DATA / name).is_dir():  # the fixtures are the first images of the real files
        real_images = read_idx(SHARED_DATA / name / "t10k-images-idx3-ubyte.gz")
        assert np.array_equal(read_idx(folder / "t10k-images-idx3-ubyte.gz"), real_images[:n_test])


# --------------------------------------------------------------------------- download on demand


def _serve_fixture(monkeypatch, folder: Path, tamper: str | None = None) -> list[str]:
    """Serve ``folder``'s IDX files as the canonical MNIST downloads, checksums patched in.

    ``tamper`` names a file whose served bytes differ from the verified content while
    matching the patched MD5 (as a corrupted copy with a colliding or mis-listed MD5 would).
    """
    payloads = {p.name: p.read_bytes() for p in folder.iterdir()}
    raw = {k: hashlib.sha256(gzip.decompress(v)).hexdigest() for k, v in payloads.items()}
    if tamper:
        payloads[tamper] = gzip.compress(gzip.decompress(payloads[tamper])[:-1] + b"\xff")
    monkeypatch.setitem(data._SOURCES["mnist"], "files",
                        {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()})
    monkeypatch.setitem(data._SOURCES["mnist"], "raw_sha256", raw)
    return _serve(monkeypatch, payloads)


def test_canonical_raw_checksums_match_the_real_files():
    # The decompressed-content SHA-256 of each canonical file, checked against our copies.
    for name in ("mnist", "fashion-mnist"):
        d = _real_dir(name)
        for fname, digest in data._SOURCES[name]["raw_sha256"].items():
            assert data._raw_sha256(d / fname) == digest, fname


def test_missing_data_is_downloaded_into_the_cache(tmp_path, monkeypatch, mnist_dir, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("POSITNN_DATA", str(cache))
    asked = _serve_fixture(monkeypatch, mnist_dir)
    ds = load_dataset("mnist", "test", data_dir=tmp_path / "nowhere")
    assert ds.source == cache / "mnist" and len(ds) == 128
    assert len(asked) == 4 and asked[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(p.name for p in mnist_dir.iterdir())
    for p in mnist_dir.iterdir():  # the verified bytes, and no temporary file left beside them
        assert (cache / "mnist" / p.name).read_bytes() == p.read_bytes()
    assert "downloading" in capsys.readouterr().err
    load_dataset("mnist", "train", data_dir=tmp_path / "nowhere")  # found in the cache now
    assert len(asked) == 4


def test_download_to_home_cache_without_positnn_data(tmp_path, monkeypatch, mnist_dir, isolated_home):
    _serve_fixture(monkeypatch, mnist_dir)
    assert data.cache_dir() == isolated_home / ".cache" / "positnn"
    assert load_dataset("mnist", "train").source == isolated_home / ".cache" / "positnn" / "mnist"


def test_download_with_bad_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch, mnist_dir):
    cache = tmp_path / "cache"
    monkeypatch.setenv("POSITNN_DATA", str(cache))
    _serve_fixture(monkeypatch, mnist_dir, tamper="t10k-images-idx3-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch") as info:
        load_dataset("mnist", "test", data_dir=tmp_path / "nowhere")
    assert "sha256 of the decompressed content" in str(info.value)
    assert not (cache / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert [p.name for p in (cache / "mnist").iterdir() if p.name.startswith(".")] == []


def test_interrupted_download_leaves_no_partial_file(tmp_path, monkeypatch):
    class Broken(io.BytesIO):
        def read(self, *args):
            if self.tell() > 0:
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(10)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: Broken(b"x" * 100))
    with pytest.raises(DownloadError, match="Connection reset"):
        fetch("mnist", tmp_path)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_offline_message_says_where_it_looked_what_failed_and_how_to_get_it(tmp_path, monkeypatch,
                                                                             isolated_home):
    monkeypatch.setenv("POSITNN_DATA", str(tmp_path / "env"))
    # conftest makes every download fail as an offline machine's would.
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    for d in candidate_dirs("fashion-mnist", tmp_path / "nowhere"):
        assert str(d) in msg
    assert f"Downloading it into {tmp_path / 'env'} failed" in msg
    assert "network disabled in the test suite" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz" in msg
    assert "positnn data fetch fashion-mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(DatasetNotFoundError, match="Looked in") as info:
        load_dataset("mnist", "test", data_dir=tmp_path / "nowhere", download=False)
    assert "Downloading" not in str(info.value)


def test_train_command_without_data_exits_2_with_the_instructions(tmp_path, capsys):
    from positnn.cli import main

    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "positnn data fetch mnist" in err and "failed" in err and str(tmp_path / "nowhere") in err


@pytest.mark.parametrize("fname,ndim", [("train-images-idx3-ubyte.gz", 5), ("train-labels-idx1-ubyte.gz", 5),
                                        ("train-labels-idx1-ubyte.gz", 0xFF)])
def test_bad_ndim_header_byte(tmp_path, fname, ndim):
    write_mnist(tmp_path, n_train=40)
    _corrupt(tmp_path / fname, lambda b: b[:3] + bytes([ndim]) + b[4:])
    with pytest.raises(CorruptDatasetError) as info:
        load_dataset("mnist", "train", data_dir=tmp_path)
    msg = str(info.value)
    assert fname in msg and f"header byte 3 (number of dimensions) 0x{ndim:02x} = {ndim}" in msg
    assert f"idx{fname[fname.index('idx') + 3]}" in msg


def test_huge_header_shape_in_a_renamed_file_is_reported_without_overflow(tmp_path):
    # No idxN in the name: the shape comes from the bytes; its size must not wrap around.
    p = tmp_path / "labels.bin"
    p.write_bytes(bytes([0, 0, 8, 5]) + np.array([128, 117571840, 67175433, 84475910, 150995205],
                                                 ">u4").tobytes() + b"\0" * 64)
    with pytest.raises(CorruptDatasetError, match=r"truncated: header \(magic number 0x00000805, 5 "
                                                  r"dimensions\)") as info:
        read_idx(p)
    assert str(2**64) not in str(info.value) and "-" not in str(info.value).split("says shape")[1]
