"""``positnn reproduce``: run the paper's table configurations and set ours beside theirs."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

from .policy import tomllib
from .report import PAPER_TABLE4, PAPER_TABLE7, markdown_table, plot_runs, read_metrics
from .train import TrainConfig

TABLES = ("table4", "table7")


def table_configs(table: str, *, datasets: list[str] | None = None, **overrides) -> dict[str, TrainConfig]:
    """Run name -> config for the cells of the paper's Table 4 or Table 7 (LeNet-5)."""
    if table == "table7":
        datasets = datasets or ["mnist", "fashion-mnist"]
        return {f"{ds}-{p}": TrainConfig(dataset=ds, policy=p, **overrides) for ds in datasets for p in PAPER_TABLE7}
    if table == "table4":
        return {f"fashion-mnist-{p}": TrainConfig(dataset="fashion-mnist", policy=p, **overrides) for p in PAPER_TABLE4}
    raise ValueError(f"table must be one of {TABLES} or a .toml file, got {table!r}")


# What each TrainConfig key may hold in a TOML file (a TOML integer is fine for a float key).
_TOML_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string")}


def _check_types(path: str | os.PathLike, name: str, cfg: dict) -> None:
    """Name the file, run, key and value of a mistyped entry (``epochs = "ten"``)."""
    for f in fields(TrainConfig):
        if f.name not in cfg:
            continue
        value = cfg[f.name]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind.split(" ")[0] not in _TOML_TYPES:
            continue  # a type this check does not know: TrainConfig validates it
        allowed, words = _TOML_TYPES[kind.split(" ")[0]]
        # bool is an int to Python, but `epochs = true` is a mistake, not 1 epoch.
        if isinstance(value, bool) or not isinstance(value, allowed):
            optional = " (or leave the key out)" if "None" in kind else ""
            raise ValueError(f"{path}: [runs.{name}] {f.name} = {value!r}: {f.name} must be {words}{optional}")


def toml_configs(path: str | os.PathLike, **overrides) -> dict[str, TrainConfig]:
    """Run name -> config from a TOML file of [runs.NAME] tables (keys of TrainConfig).

    ``overrides`` (the command line's ``--epochs``, ``--subset``, ``--data-dir``) replace
    the file's values in every run. Every error names the file, and the run and key
    concerned: ``ValueError`` for invalid TOML, unknown keys and bad values.
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"runs"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: only [runs.NAME] tables")
    runs = doc.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"{path}: expected [runs.NAME] tables with TrainConfig keys")
    configs = {}
    for name, cfg in runs.items():
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: runs.{name} = {cfg!r} should be a [runs.{name}] table of TrainConfig keys")
        _check_types(path, name, cfg)
        try:
            configs[name] = TrainConfig.from_dict(cfg | overrides)
        except (ValueError, TypeError) as exc:
            # TrainConfig's own message names the key; say which file and run it came from.
            raise ValueError(f"{path}: [runs.{name}]: {exc}") from None
    return configs


def _launch(name: str, config: TrainConfig, out: Path, threads: int) -> int:
    """One run in its own process (so runs can go in parallel), resuming if it has begun."""
    run_dir = out / name
    args = [sys.executable, "-m", "positnn.cli", "train", "--out", str(run_dir), "--no-progress",
            "--threads", str(config.threads or threads)]  # a run's own threads (TOML) win
    for key, value in asdict(config).items():
        if value is not None and key != "threads":
            args += [f"--{key.replace('_', '-')}", str(value)]
    if (run_dir / "checkpoint.pt").exists():
        args.append("--resume")
    log = out / f"{name}.log"
    with open(log, "a") as f:
        return subprocess.run(args, stdout=f, stderr=subprocess.STDOUT).returncode


def reproduce(table: str, out: str | os.PathLike, *, jobs: int = 1, threads: int | None = None, **overrides) -> Path:
    """Run every configuration of ``table`` (finished runs are kept, begun ones resumed),
    then write ``out/results.md`` and ``out/curves.png``. Each run gets ``threads`` threads
    (default: the CPUs shared among the ``jobs`` parallel runs).

    ``overrides`` (``epochs``, ``subset``, ``data_dir``, ...) apply to every run, of a named
    table or of a TOML file alike. ``data_dir`` is passed on as given: a relative one stays
    relative in each run's config.json, so committed results name no machine's paths.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 (or None: the CPUs shared among the jobs), got {threads!r}")
    out = Path(out)
    if str(table).endswith(".toml"):
        if "datasets" in overrides:
            raise ValueError(f"datasets={overrides['datasets']!r} applies to table7 only, not to {table}")
        configs = toml_configs(table, **overrides)
    else:
        configs = table_configs(table, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    todo = {n: c for n, c in configs.items() if not _finished(out / n, c)}
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        codes = dict(zip(todo, pool.map(lambda nc: _launch(nc[0], nc[1], out, threads), todo.items())))
    failed = [n for n, code in codes.items() if code != 0]
    write_results(table, configs, out)
    if failed:
        raise RuntimeError(f"runs failed: {failed}; see their .log files in {out}")
    return out / "results.md"


def _finished(run_dir: Path, config: TrainConfig) -> bool:
    try:
        return len(read_metrics(run_dir)) >= config.epochs
    except FileNotFoundError:
        return False


def write_results(table: str, configs: dict[str, TrainConfig], out: Path) -> Path:
    """The Markdown table of our final accuracy beside the paper's, and the curves."""
    rows, done = [], []
    for name, cfg in configs.items():
        try:
            metrics = read_metrics(out / name)
        except FileNotFoundError:
            metrics = []
        ours = f"{metrics[-1]['top1']:.2f}%" if metrics else "not run"
        if metrics and len(metrics) < cfg.epochs:
            ours += f" (after {len(metrics)} of {cfg.epochs} epochs)"
        if metrics and cfg.subset:
            ours += f" (first {cfg.subset:,} images, {cfg.epochs} epochs)"
        paper = (PAPER_TABLE7.get(cfg.policy, {}).get(cfg.dataset) if Path(str(table)).stem == "table7"
                 else PAPER_TABLE4.get(cfg.policy))
        rows.append([cfg.dataset, cfg.policy, ours, f"{paper:.2f}%" if paper is not None else "-"])
        if metrics:
            done.append(out / name)
    text = f"# {Path(str(table)).stem}: final test top-1 accuracy, LeNet-5\n\n"
    text += markdown_table(["dataset", "configuration", "positnn (ours)", "paper"], rows)
    if done:
        plot_runs(done, out / "curves.png")
        text += "\n![curves](curves.png)\n"
    (out / "results.md").write_text(text)
    return out / "results.md"
