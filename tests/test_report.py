"""``positnn plot`` / report.plot_runs on damaged metrics files: a clear error, no PNG."""

from __future__ import annotations

import re

import pytest

from positnn.cli import main
from positnn.report import plot_runs, read_metrics

GOOD = "epoch,lr,train_loss,test_loss,top1,topk,k\n1,0.0625,0.5,0.4,88.0,99.0,5\n2,0.0625,0.3,0.3,91.5,99.5,5\n"


def _run(tmp_path, text: str | bytes, name: str = "run"):
    d = tmp_path / name
    d.mkdir()
    if isinstance(text, bytes):
        (d / "metrics.csv").write_bytes(text)
    else:
        (d / "metrics.csv").write_text(text)
    return d


@pytest.mark.parametrize("text,pattern", [
    ("hello,world\n1,2\n", r"missing column\(s\) \['epoch', 'top1', 'train_loss', 'test_loss'\]"),
    ("epoch,lr,train_loss,test_loss\n1,0.1,0.5,0.4\n", r"missing column\(s\) \['top1'\]"),
    ("epoch,lr,train_loss,test_loss,top1\n", r"no rows"),
    ("", r"missing column\(s\)"),
    ("epoch,lr,train_loss,test_loss,top1\n1,0.1,0.5,0.4,abc\n", r"line 2: column 'top1' holds 'abc', not a number"),
    ("epoch,lr,train_loss,test_loss,top1\none,0.1,0.5,0.4,9\n", r"line 2: column 'epoch' holds 'one', not an integer"),
    ("epoch,lr,train_loss,test_loss,top1\n1,0.1,0.5\n", r"line 2: 3 fields where the header .* has 5"),
    ("\x89PNG\r\n\x1a\n\x00\x00garbage\n", r"missing column\(s\)"),
    (b"\xff\xfe\x00binary", r"not a text CSV file"),
], ids=["garbage", "missing column", "no rows", "empty file", "non-numeric", "bad epoch", "short row", "png",
        "binary"])
def test_plot_of_a_bad_metrics_file_names_it_and_writes_nothing(tmp_path, capsys, text, pattern):
    good, bad = _run(tmp_path, GOOD, "good"), _run(tmp_path, text, "bad")
    png = tmp_path / "curves.png"
    with pytest.raises(ValueError, match=pattern) as info:
        plot_runs([good, bad], png)
    assert str(bad / "metrics.csv") in str(info.value)
    assert not png.exists()
    assert main(["plot", str(good), str(bad), "-o", str(png)]) == 2
    err = capsys.readouterr().err
    assert str(bad / "metrics.csv") in err and re.search(pattern, err)
    assert not png.exists()


def test_plot_of_good_runs_still_works(tmp_path):
    png = plot_runs([_run(tmp_path, GOOD, "a"), _run(tmp_path, GOOD + "3,0.03,0.2,0.2,92.0,99.6,5\n", "b")],
                    tmp_path / "out" / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["epoch"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]
    assert read_metrics(tmp_path / "a")[1]["top1"] == 91.5


def test_plot_of_no_metrics_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_plot_draws_language_model_runs_per_iteration_and_refuses_a_mix(tmp_path):
    lm = "iter,lr,train_loss,val_loss,seconds\n0,1e-05,4.19,4.19,1.0\n250,0.001,2.4,2.5,90.0\n"
    a, b = _run(tmp_path, lm, "a"), _run(tmp_path, lm.replace("2.5,", "2.6,"), "b")
    png = tmp_path / "lm.png"
    assert main(["plot", str(a), str(b), "-o", str(png)]) == 0 and png.stat().st_size > 1000
    image = _run(tmp_path, GOOD, "img")
    with pytest.raises(ValueError, match="together"):
        plot_runs([a, image], tmp_path / "mixed.png")
    assert not (tmp_path / "mixed.png").exists()
    with pytest.raises(ValueError, match=r"missing column\(s\) \['val_loss'\]"):
        plot_runs([_run(tmp_path, "iter,train_loss\n0,4.1\n", "c")], tmp_path / "c.png")
