"""The training loop and the ``positnn`` command on small subsets of the real data.

They read the MNIST fixture committed in tests/fixtures/mnist (256 training and 128 test
images of the real set), so they run on every clone, with or without the full data sets.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from positnn.cli import main
from positnn.train import TrainConfig, load_model, train

# The folder of conftest's ``mnist_dir`` fixture, as a constant for the helpers below.
MNIST = Path(__file__).resolve().parent / "fixtures" / "mnist"


def tiny(**kw) -> TrainConfig:
    base = dict(dataset="mnist", data_dir=str(MNIST), subset=192, batch_size=64, test_batch_size=96, epochs=2, threads=1)
    return TrainConfig(**(base | kw))


def test_train_command_writes_metrics_checkpoint_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "mnist", "--data-dir", str(MNIST), "--subset", "128", "--epochs", "1",
                 "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.tmp").exists()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss,test_loss,top1") and len(rows) == 2
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and 0 <= row["top1"] <= 100 and math.isfinite(row["train_loss"])
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["policy"] == "posit8-O16-L16q" and "torch" in config["versions"]
    assert "top-1" in capsys.readouterr().out

    # A second train into the same directory refuses instead of overwriting the run.
    assert main(["train", "--out", str(out), "--no-progress"]) == 2

    png = tmp_path / "curves.png"
    assert main(["plot", str(out), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["eval", str(out / "checkpoint.pt")]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("policy", ["posit8-O16-L16q", "float32"])
def test_resume_after_kill_is_bit_identical(tmp_path, policy):
    cfg = tiny(policy=policy)
    whole = train(cfg, tmp_path / "whole", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "split", progress=False, log=lambda s: None, stop_after=1)  # "killed" after epoch 1
    resumed = train(cfg, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


def test_checkpoint_reloads_the_trained_model(tmp_path):
    cfg = tiny(epochs=1)
    train(cfg, tmp_path, progress=False, log=lambda s: None)
    model, loaded = load_model(tmp_path / "checkpoint.pt")
    assert loaded == cfg
    x = torch.zeros(2, 1, 28, 28)
    assert model(x).shape == (2, 10)


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny(epochs=1), tmp_path, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="differs"):
        train(tiny(epochs=2, lr=0.5), tmp_path, resume=True, progress=False, log=lambda s: None)


def test_bad_inputs_get_clear_errors(capsys):
    assert main(["train", "--policy", "posit8-X16", "--no-progress"]) == 2
    assert "posit8-X16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})


def test_formats_table(capsys):
    assert main(["formats", "--nbits", "8", "--es", "0..2"]) == 0
    out = capsys.readouterr().out
    assert "| posit(8,2) | 2^-24 | 2^24 | 4 | float32 | int8 | 128 |" in out


def test_reproduce_from_toml_writes_the_table_and_curves(tmp_path):
    spec = tmp_path / "runs.toml"
    spec.write_text(
        "[runs.tiny-float]\n"
        f'dataset = "mnist"\npolicy = "float32"\nepochs = 1\nsubset = 128\ndata_dir = "{MNIST}"\n'
    )
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "res")]) == 0
    text = (tmp_path / "res" / "results.md").read_text()
    assert "| mnist | float32 |" in text and "not run" not in text
    assert (tmp_path / "res" / "curves.png").exists()


def test_resume_from_the_command_line_keeps_the_runs_config(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--dataset", "mnist", "--data-dir", str(MNIST), "--subset", "128", "--out", str(out),
            "--no-progress", "--threads", "1", "--policy", "float32"]
    assert main(base + ["--epochs", "1"]) == 0
    # Only --out, --resume and more epochs: dataset, subset and policy come from the checkpoint.
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3


def test_resnet20_trains_on_grayscale_images_and_gpt_is_refused_as_an_image_model(tmp_path, capsys):
    out = tmp_path / "rn"
    code = main(["train", "--model", "resnet20", "--dataset", "mnist", "--data-dir", str(MNIST), "--subset", "64",
                 "--epochs", "1", "--test-batch-size", "64", "--out", str(out), "--no-progress", "--threads", "1"])
    assert code == 0
    model, cfg = load_model(out / "checkpoint.pt")
    assert cfg.model == "resnet20" and model.conv1.in_channels == 1
    assert main(["train", "--model", "gpt", "--dataset", "mnist", "--out", str(tmp_path / "g")]) == 2
    assert "tinyshakespeare" in capsys.readouterr().err
