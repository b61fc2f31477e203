"""Safety of ``positnn train / eval / quantize-eval``: crafted and corrupt checkpoints,
run folders that are not ours, policy files that change after a run, resume options and
bad hyperparameters. Every test uses a tiny MNIST-layout data set written into tmp_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from positnn.cli import main
from positnn.train import TrainConfig, train
from test_data import write_mnist


@pytest.fixture(autouse=True)
def _isolated_data(tmp_path_factory, monkeypatch):
    """Only the folders a test names hold data (no ~/.cache/positnn, no $POSITNN_DATA)."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("POSITNN_DATA", raising=False)


def _data(folder: Path) -> Path:
    write_mnist(folder, n_train=32, n_test=16)
    return folder


def _train_args(data: Path, out: Path, *extra: str, policy: str = "float32", model: str = "lenet5") -> list[str]:
    return ["train", "--dataset", "mnist", "--data-dir", str(data), "--model", model, "--policy", policy,
            "--batch-size", "16", "--test-batch-size", "16", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory) -> Path:
    """A finished 1-epoch float32 run (its folder)."""
    root = tmp_path_factory.mktemp("float_run")
    out = root / "run"
    assert main(_train_args(_data(root / "data"), out, "--epochs", "1")) == 0
    return out


# --------------------------------------------------------------------------- 1: crafted checkpoints


class _Evil:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.mark.parametrize("command", ["eval", "quantize-eval", "resume"])
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, capsys, command):
    sentinel = tmp_path / "SENTINEL"
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    torch.save({"config": _Evil(sentinel), "model": {}}, ckpt)
    argv = {"eval": ["eval", str(ckpt)], "quantize-eval": ["quantize-eval", str(ckpt)],
            "resume": ["train", "--out", str(out), "--resume", "--no-progress"]}[command]
    assert main(argv) == 2
    assert not sentinel.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(ckpt) in err and "GLOBAL exec" in err
    torch.load(ckpt, weights_only=False)  # the payload is real: an unsafe load does run it
    assert sentinel.exists()


def test_real_checkpoint_loads_with_weights_only(tmp_path):
    """Every part of a posit run's checkpoint (posit modules' _extra_state, optimizer and
    scheduler state, history, versions, RNG state) is weights_only-safe."""
    cfg = TrainConfig(dataset="mnist", data_dir=str(_data(tmp_path / "data")), model="mlp", batch_size=16,
                      test_batch_size=16, epochs=1, threads=1)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert isinstance(ckpt["model"], dict) and any(k.endswith("_extra_state") for k in ckpt["model"])
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and TrainConfig.from_dict(ckpt["config"]) == cfg


# --------------------------------------------------------------------------- 2: corrupt input


def _corrupt(kind: str, path: Path, real: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    elif kind == "text":
        path.write_text("these are my notes, not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "no-config":
        torch.save({"model": {}}, path)
    elif kind == "no-model":
        torch.save({"config": {}}, path)
    elif kind == "bad-config":
        torch.save({"config": {"epochs": "ten"}, "model": {}}, path)
    elif kind == "wrong-weights":
        ckpt = torch.load(real, weights_only=True)
        ckpt["model"] = {"fc9.weight": torch.zeros(3)}
        torch.save(ckpt, path)


CORRUPT = ["empty", "truncated", "text", "list", "no-config", "no-model", "bad-config", "wrong-weights"]


@pytest.mark.parametrize("kind", CORRUPT)
def test_eval_of_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, float_run, kind):
    bad = tmp_path / "bad.pt"
    _corrupt(kind, bad, float_run / "checkpoint.pt")
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "Traceback" not in err


@pytest.mark.parametrize("kind", CORRUPT)
def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, float_run, kind):
    out = tmp_path / "run"
    shutil.copytree(float_run, out)
    _corrupt(kind, out / "checkpoint.pt", float_run / "checkpoint.pt")
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out / "checkpoint.pt") in err


# --------------------------------------------------------------------------- 3: --out not ours


@pytest.mark.parametrize("names", [("config.json", "metrics.csv"), ("notes.txt",)])
def test_train_refuses_a_non_empty_folder_that_is_not_a_run(tmp_path, capsys, names):
    out = tmp_path / "mine"
    out.mkdir()
    for name in names:
        (out / name).write_text("keep me\n")
    assert main(_train_args(_data(tmp_path / "data"), out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and all(n in err for n in names)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all((out / n).read_text() == "keep me\n" for n in names)


def test_a_run_stopped_in_its_first_epoch_is_resumable(tmp_path):
    cfg = TrainConfig(dataset="mnist", data_dir=str(_data(tmp_path / "data")), policy="float32", batch_size=16,
                      test_batch_size=16, epochs=1, threads=1)
    whole = train(cfg, tmp_path / "whole", progress=False, log=lambda s: None)
    assert train(cfg, tmp_path / "split", progress=False, log=lambda s: None, stop_after=0) == []
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)


# --------------------------------------------------------------------------- 4: policy files


def test_a_runs_policy_file_can_change_or_vanish(tmp_path, capsys):
    data = _data(tmp_path / "data")
    toml = tmp_path / "policy.toml"
    toml.write_text('recipe = "posit8-O16-L16q"\non_nar = "report"\n\n[layers."fc*"]\nF = "p16e1"\n')
    args = lambda out, *extra: _train_args(data, out, *extra, policy=str(toml), model="mlp")  # noqa: E731
    assert main(args(tmp_path / "whole", "--epochs", "2")) == 0
    assert main(args(tmp_path / "split", "--epochs", "1")) == 0
    saved = json.loads((tmp_path / "split" / "config.json").read_text())["config"]
    assert saved["policy"] == str(toml) and saved["policy_spec"]["layers"] == {"fc*": {"forward": "posit(16,1)"}}
    capsys.readouterr()

    ckpt = str(tmp_path / "split" / "checkpoint.pt")
    assert main(["eval", ckpt]) == 0
    before = capsys.readouterr().out
    toml.write_text('recipe = "float32"\n')  # edited ...
    assert main(["eval", ckpt]) == 0
    assert capsys.readouterr().out == before
    toml.unlink()  # ... and deleted
    assert main(["eval", ckpt]) == 0
    assert capsys.readouterr().out == before

    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--epochs", "2", "--no-progress"]) == 0
    def rows(run: str) -> list[list[str]]:  # all but the seconds column
        return [r.split(",")[:-1] for r in (tmp_path / run / "metrics.csv").read_text().splitlines()]

    assert rows("split") == rows("whole")


# --------------------------------------------------------------------------- 5: resume options


def test_resume_takes_a_new_data_dir(tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(_data(tmp_path / "old"), out, "--epochs", "1")) == 0
    (tmp_path / "old").rename(tmp_path / "new")  # the data moved
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--data-dir", str(tmp_path / "new"),
                 "--no-progress"]) == 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["data_dir"] == str(tmp_path / "new")


def test_resume_refuses_other_changed_options(tmp_path, capsys):
    out = tmp_path / "run"
    data = _data(tmp_path / "data")
    assert main(_train_args(data, out, "--epochs", "1")) == 0
    before = (out / "metrics.csv").read_text()
    capsys.readouterr()
    changes = (("--lr", "0.0625", "0.5"), ("--batch-size", "16", "8"), ("--policy", "float32", "posit8"))
    for option, saved, given in changes:
        assert main(["train", "--out", str(out), "--resume", "--epochs", "2", option, given, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and option[2:].replace("-", "_") in err and saved in err and given in err
    assert (out / "metrics.csv").read_text() == before
    # The saved values themselves, given again (as `positnn reproduce` does), are no change.
    assert main(_train_args(data, out, "--epochs", "1", "--resume", "--lr", "0.0625")) == 0


# --------------------------------------------------------------------------- 6: bad values


@pytest.mark.parametrize("option, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--momentum", "nan"), ("--momentum", "-1"),
    ("--lr-gamma", "-1"), ("--lr-gamma", "0"), ("--lr-gamma", "2"), ("--threads", "-1"), ("--threads", "0"),
    ("--seed", "-1"),
])
def test_bad_hyperparameters_are_refused_before_training(tmp_path, capsys, option, value):
    out = tmp_path / "run"
    assert main(_train_args(_data(tmp_path / "data"), out, "--epochs", "1", option, value)) == 2
    err = capsys.readouterr().err
    field = option[2:].replace("-", "_")
    assert err.startswith(f"error: {field} must be ") and value in err
    assert not out.exists()


@pytest.mark.parametrize("key, value, expected", [
    ("epochs", "ten", "an integer"), ("epochs", 2.5, "an integer"), ("epochs", True, "an integer"),
    ("lr", "0.1", "a number"), ("lr", True, "a number"), ("policy", 8, "a string"), ("subset", "all", "an integer"),
])
def test_config_fields_are_type_checked(key, value, expected):
    with pytest.raises(ValueError, match=f"{key} must be {expected}"):
        TrainConfig.from_dict({key: value})


def test_config_float_fields_take_ints_as_floats():
    cfg = TrainConfig.from_dict({"lr": 1, "momentum": 0})
    assert type(cfg.lr) is float and type(cfg.momentum) is float  # so config.json and resume compare alike


def test_reproduce_toml_with_a_bad_type_is_a_clear_error(tmp_path, capsys):
    spec = tmp_path / "runs.toml"
    spec.write_text('[runs.bad]\ndataset = "mnist"\nepochs = "ten"\n')
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "res")]) == 2
    assert "epochs must be an integer" in capsys.readouterr().err
