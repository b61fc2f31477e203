"""A fresh clone, with no data sets beside it, runs the CLI tests without skipping any.

The clone is of HEAD: it tests what is committed, so uncommitted changes are not covered
here (commit first). It re-runs tests/test_cli.py in a subprocess (about 40 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _repo_root() -> Path | None:
    if shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--show-toplevel"],
                       capture_output=True, text=True)
    return Path(r.stdout.strip()) if r.returncode == 0 else None


def test_fresh_clone_runs_the_cli_tests_with_none_skipped(tmp_path):
    root = _repo_root()
    if root is None:
        pytest.skip("not inside a git checkout (or git is not installed)")
    # tmp_path/clone has no ../shared beside it: only what the repository ships is there.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(root), str(clone)], check=True)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("POSITNN_DATA", "POSITNN_SHARED_DATA")}
    env |= {"PYTHONPATH": str(clone), "HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cli.py", "-p", "no:cacheprovider"],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert r.returncode == 0, out
    assert re.search(r"\b\d+ passed\b", summary), out
    assert "skipped" not in summary and "deselected" not in summary, out
    # The clone's own package was imported, not the installed one.
    probe = subprocess.run([sys.executable, "-c", "import positnn; print(positnn.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).resolve().is_relative_to(clone.resolve())
