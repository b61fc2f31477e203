"""``positnn reproduce``: command-line overrides, portable configs, errors naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from positnn import reproduce as rep
from positnn.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def launched(monkeypatch) -> dict:
    """Replace the training subprocess by a recorder: run name -> the config it was given."""
    seen: dict = {}

    def fake_launch(name, config, out, threads):
        seen[name] = config
        return 0

    monkeypatch.setattr(rep, "_launch", fake_launch)
    return seen


def test_overrides_reach_every_run_of_a_toml_file(tmp_path, launched):
    table4 = REPO / "results" / "table4.toml"
    assert main(["reproduce", str(table4), "--epochs", "1", "--subset", "256", "--data-dir", "data/here",
                 "--out", str(tmp_path / "res")]) == 0
    assert sorted(launched) == sorted(rep.toml_configs(table4))
    for name, cfg in launched.items():
        assert (cfg.epochs, cfg.subset, cfg.data_dir) == (1, 256, "data/here"), name
    assert {c.policy for c in launched.values()} == {n.removeprefix("fashion-mnist-") for n in launched}
    assert "not run" in (tmp_path / "res" / "results.md").read_text()  # nothing really trained


def test_overrides_reach_every_run_of_a_named_table(tmp_path, launched):
    assert main(["reproduce", "table7", "--datasets", "mnist", "--epochs", "1", "--subset", "256",
                 "--out", str(tmp_path / "res")]) == 0
    assert len(launched) == 4 and all((c.dataset, c.epochs, c.subset) == ("mnist", 1, 256) for c in launched.values())


def test_threads_per_run(tmp_path, monkeypatch, capsys):
    threads: list[int] = []
    monkeypatch.setattr(rep, "_launch", lambda name, config, out, n: threads.append(n) or 0)
    table4 = str(REPO / "results" / "table4.toml")
    assert main(["reproduce", table4, "--threads", "1", "--out", str(tmp_path / "res")]) == 0
    assert threads == [1] * len(rep.toml_configs(table4))
    assert main(["reproduce", table4, "--threads", "0", "--out", str(tmp_path / "res")]) == 2
    assert "threads must be an integer >= 1" in capsys.readouterr().err
    assert len(threads) == len(rep.toml_configs(table4))  # nothing launched after the refusal


def test_without_overrides_the_files_values_stand(tmp_path, launched):
    main(["reproduce", str(REPO / "results" / "table4.toml"), "--out", str(tmp_path / "res")])
    assert launched["fashion-mnist-posit(8,0)"].epochs == 3 and launched["fashion-mnist-posit(8,0)q"].epochs == 10
    assert all(c.data_dir is None for c in launched.values())


def test_saved_config_keeps_the_data_dir_as_given(tmp_path, monkeypatch, mnist_dir):
    # A real (tiny) run, in its subprocess: the relative data dir must reach config.json as is.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(mnist_dir, tmp_path / "data" / "mnist")
    rel = os.path.join("data", "mnist")
    spec = tmp_path / "runs.toml"
    spec.write_text('[runs.tiny]\ndataset = "mnist"\npolicy = "float32"\n')
    assert main(["reproduce", "runs.toml", "--epochs", "1", "--subset", "64", "--data-dir", rel, "--out", "res"]) == 0
    saved = json.loads((tmp_path / "res" / "tiny" / "config.json").read_text())["config"]
    assert saved["data_dir"] == rel and not os.path.isabs(saved["data_dir"])
    for p in (tmp_path / "res").rglob("*"):
        if p.suffix in (".json", ".md", ".csv", ".jsonl"):
            assert str(tmp_path) not in p.read_text(), p


# Absolute paths of a machine (home, work, temporary or mount folders; Windows drives).
_ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|home|root|tmp|Users|mnt|scratch)/|\b[A-Za-z]:\\\\")


def test_committed_results_hold_no_absolute_paths():
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "results"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    files = [REPO / f for f in r.stdout.decode().split("\0") if f]
    assert files, "no tracked files under results/"
    bad = []
    for p in files:
        try:
            text = p.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # images; or a file deleted in the work tree but not yet committed
        bad += [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                if _ABSOLUTE.search(line)]
    assert not bad, "absolute paths in committed results:\n" + "\n".join(bad)


@pytest.mark.parametrize("text,pattern", [
    ('[runs.a]\nepochs = 1\n[runs.a\n', r"not valid TOML"),
    ('[runs.a]\nepochs = 1\nlearning_rate = 0.1\n', r"\[runs\.a\]: unknown config keys \['learning_rate'\]"),
    ('[runs.a]\nepochs = "ten"\n', r"\[runs\.a\] epochs = 'ten': epochs must be an integer"),
    ('[runs.a]\nsubset = 2.5\n', r"\[runs\.a\] subset = 2\.5: subset must be an integer \(or leave the key out\)"),
    ('[runs.a]\nepochs = true\n', r"\[runs\.a\] epochs = True: epochs must be an integer"),
    ('[runs.a]\nepochs = 0\n', r"\[runs\.a\]: epochs must be >= 1, got 0"),
    ('[runs.a]\npolicy = "posit8-X16"\n', r"\[runs\.a\]: .*posit8-X16"),
    ('[run.a]\nepochs = 1\n', r"unknown top-level keys \['run'\]"),
    ('runs = 3\n', r"expected \[runs\.NAME\] tables"),
    ('[runs]\na = 1\n', r"runs\.a = 1 should be a \[runs\.a\] table"),
], ids=["malformed", "unknown key", "wrong type", "float for int", "bool", "bad value", "bad policy",
        "typo table", "not a table", "not a run table"])
def test_toml_errors_name_the_file_and_the_bad_entry(tmp_path, capsys, launched, text, pattern):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    with pytest.raises(ValueError, match=pattern) as info:
        rep.toml_configs(spec)
    assert str(info.value).startswith(f"{spec}: ")
    assert main(["reproduce", str(spec), "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and re.search(pattern, err)
    assert not launched and not (tmp_path / "res").exists()  # nothing started, nothing written
