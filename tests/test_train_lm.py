"""The character-level LM run: corpus, schedule, CLI, resume and sampling, on a small
fixture text (the first 3,000 characters of tiny Shakespeare)."""

import json
import math
from pathlib import Path

import pytest
import torch

from positnn.cli import main
from positnn.data import CharCorpus, load_text
from positnn.train_lm import LMConfig, read_lm_checkpoint, sample, train_lm

TEXT_DIR = Path(__file__).parent / "fixtures" / "tinytext"
TINY = dict(max_iters=4, batch_size=2, block_size=8, n_layer=1, n_head=2, n_embd=16, eval_interval=2, eval_iters=1,
            data_dir=str(TEXT_DIR), threads=1)


def test_corpus_splits_90_10_and_round_trips():
    text = (TEXT_DIR / "input.txt").read_text()
    c = CharCorpus.from_text(text)
    assert len(c.train) == int(0.9 * len(text)) and len(c.train) + len(c.val) == len(text)
    assert c.chars == "".join(sorted(set(text)))
    assert c.decode(c.train[:50]) == text[:50] and torch.equal(c.encode(text[:50]), c.train[:50])
    with pytest.raises(ValueError, match="not in the corpus"):
        c.encode("\x00")


def test_load_text_checks_the_real_file_and_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSITNN_DATA", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="curl -o"):
        load_text()
    (tmp_path / "cache" / "tinyshakespeare").mkdir(parents=True)
    (tmp_path / "cache" / "tinyshakespeare" / "input.txt").write_text("not shakespeare at all, really")
    with pytest.raises(ValueError, match="sha256"):
        load_text()
    assert load_text(TEXT_DIR).chars  # a user's own text, named explicitly, is taken as it is


def test_schedule_is_nanogpts():
    c = LMConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert c.lr_at(0) == pytest.approx(1e-3 / 101) and c.lr_at(99) == pytest.approx(1e-3 * 100 / 101)
    assert c.lr_at(100) == pytest.approx(1e-3)
    assert c.lr_at(1050) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert c.lr_at(2001) == 1e-4
    for bad in (dict(lr=math.nan), dict(min_lr=1.0), dict(max_iters=0), dict(dropout=1.0), dict(threads=0)):
        with pytest.raises(ValueError):
            LMConfig(**bad)


def test_train_resume_is_bit_identical_and_sample_works(tmp_path):
    cfg = LMConfig(**TINY)
    whole = train_lm(cfg, tmp_path / "whole", progress=False, log=lambda s: None)
    train_lm(cfg, tmp_path / "split", progress=False, log=lambda s: None, stop_after=2)
    split = train_lm(cfg, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    assert whole == split or [r | {"seconds": 0} for r in whole] == [r | {"seconds": 0} for r in split]
    a = read_lm_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if isinstance(a["model"][k], torch.Tensor))
    text = sample(tmp_path / "whole", 20, prompt="Fi", seed=1)
    assert text.startswith("Fi") and len(text) == 22 and set(text) <= set(a["vocab"])
    assert text == sample(tmp_path / "whole", 20, prompt="Fi", seed=1)  # seeded


def test_cli_trains_and_samples_and_refuses_image_options(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "gpt", "--out", str(out), "--no-progress"]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert main(args) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "iter,lr,train_loss,val_loss,seconds" and len(rows) == 4  # iters 0, 2 and the last
    assert json.loads((out / "config.json").read_text())["config"]["n_embd"] == 16
    assert main(["sample", str(out), "--max-new-tokens", "10"]) == 0
    assert main(args) == 2  # the folder holds a run: refused, nothing overwritten
    assert main(["train", "--model", "gpt", "--epochs", "2", "--out", str(tmp_path / "x")]) == 2
    assert main(["train", "--max-iters", "5", "--out", str(tmp_path / "y")]) == 2
    assert "do not apply" in capsys.readouterr().err
