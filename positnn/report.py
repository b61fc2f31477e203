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


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The per-epoch rows of a run directory's metrics.csv, with numbers parsed."""
    path = Path(run) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run} a positnn run directory?")
    with open(path, newline="") as f:
        return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_runs(runs: list[str | os.PathLike], output: str | os.PathLike, labels: list[str] | None = None) -> Path:
    """Test accuracy and train/test loss per epoch of several runs, on one PNG."""
    labels = labels or [Path(r).name for r in runs]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, label in zip(runs, labels):
        rows = read_metrics(run)
        epochs = [r["epoch"] for r in rows]
        line, = ax_acc.plot(epochs, [r["top1"] for r in rows], marker="o", ms=3, label=label)
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=line.get_color(), ls="--")
        ax_loss.plot(epochs, [r["test_loss"] for r in rows], color=line.get_color(), label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross entropy", title="loss (solid: test, dashed: train)", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
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
