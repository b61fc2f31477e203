"""Reading run directories, plotting their curves, and the paper's tables beside ours."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

# The paper's final accuracies (%), notes section 4: Table 7 (10 epochs) and Table 4
# (Fashion-MNIST, 8 bits in every stage, without / with quire).
PAPER_TABLE7 = {
    "float32": {"mnist": 99.21, "fashion-mnist": 90.28, "cifar10": 70.79, "cifar100": 36.35},
    "posit8-O16-L16q": {"mnist": 99.19, "fashion-mnist": 90.46, "cifar10": 71.30, "cifar100": 35.41},
    "posit8-O16-L12q": {"mnist": 99.17, "fashion-mnist": 90.14, "cifar10": 71.09, "cifar100": 35.27},
    "posit8-O12-L12q": {"mnist": 99.20, "fashion-mnist": 90.07, "cifar10": 68.28, "cifar100": 25.85},
}
PAPER_TABLE4 = {
    "posit(8,0)": 10.00, "posit(8,0)q": 15.12,
    "posit(8,1)": 12.54, "posit(8,1)q": 15.41,
    "posit(8,2)": 12.55, "posit(8,2)q": 19.39,
}


# The columns plot_runs draws; train.py writes these and more (lr, top-k, seconds, ...),
# and train_lm.py the second set, per evaluation.
PLOT_COLUMNS = ("epoch", "top1", "train_loss", "test_loss")
LM_PLOT_COLUMNS = ("iter", "train_loss", "val_loss")


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of a run directory's metrics.csv, with numbers parsed.

    Raises ``FileNotFoundError`` when there is no metrics.csv and ``ValueError`` naming the
    file, line and column of a row with the wrong number of fields or a non-numeric value.
    """
    path = Path(run) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run} a positnn run directory?")
    try:
        return _parse_metrics(path)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text CSV file ({exc})") from None


def _parse_metrics(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for fields in reader:
            if not fields:
                continue  # a blank line, as csv.DictReader would skip it
            if len(fields) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: {len(fields)} fields where the header "
                                 f"{header} has {len(header)}")
            parsed = {}
            for k, v in zip(header, fields):
                try:
                    parsed[k] = int(v) if k == "epoch" else float(v)
                except ValueError:
                    kind = "an integer" if k == "epoch" else "a number"
                    raise ValueError(f"{path}, line {reader.line_num}: column {k!r} holds {v!r}, "
                                     f"not {kind}") from None
            rows.append(parsed)
    return rows


def _plot_metrics(run: str | os.PathLike) -> tuple[str, list[dict]]:
    """read_metrics, plus what plotting needs: the drawn columns of an image run
    ("epochs") or a language-model run ("iterations"), and at least one row."""
    path = Path(run) / "metrics.csv"
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: is {run} a positnn run directory?") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text CSV file ({exc})") from None
    kind = "iterations" if "iter" in header else "epochs"
    columns = LM_PLOT_COLUMNS if kind == "iterations" else PLOT_COLUMNS
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a metrics.csv needs {list(PLOT_COLUMNS)} "
                         f"(image runs) or {list(LM_PLOT_COLUMNS)} (language-model runs) (its header: {header})")
    rows = read_metrics(run)
    if not rows:
        raise ValueError(f"{path}: no rows (no epoch finished yet?); nothing to plot")
    return kind, rows


def plot_runs(runs: list[str | os.PathLike], output: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Test accuracy and train/test loss per epoch of several runs, on one PNG.

    Every run's metrics.csv is checked before anything is drawn: a ``ValueError`` names the
    file and what is wrong (missing columns, no rows, non-numeric values), and no PNG is
    written.
    """
    if not runs:
        raise ValueError("no run directories given to plot")
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    checked = [_plot_metrics(run) for run in runs]
    kinds = {kind for kind, _ in checked}
    if len(kinds) > 1:
        raise ValueError(f"cannot plot image runs (per epoch) and language-model runs (per iteration) together: {runs}")
    metrics = [rows for _, rows in checked]
    if kinds == {"iterations"}:
        return _plot_lm(metrics, labels, output)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rows, label in zip(metrics, labels):
        epochs = [r["epoch"] for r in rows]
        line, = ax_acc.plot(epochs, [r["top1"] for r in rows], marker="o", ms=3, label=label)
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=line.get_color(), ls="--")
        ax_loss.plot(epochs, [r["test_loss"] for r in rows], color=line.get_color(), label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross entropy", title="loss (solid: test, dashed: train)", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    return _save(fig, output)


def _plot_lm(metrics: list[list[dict]], labels: list[str], output: str | os.PathLike) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rows, label in zip(metrics, labels):
        iters = [r["iter"] for r in rows]
        line, = ax.plot(iters, [r["val_loss"] for r in rows], marker="o", ms=3, label=label)
        ax.plot(iters, [r["train_loss"] for r in rows], color=line.get_color(), ls="--")
    ax.set(xlabel="iteration", ylabel="cross entropy (nats per character)",
           title="validation (solid) and train (dashed) loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, output)


def _save(fig, output: str | os.PathLike) -> Path:
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
