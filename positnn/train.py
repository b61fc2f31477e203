"""The training loop behind ``positnn train``: the paper's protocol, logs and checkpoints.

A run directory holds ``config.json`` (the exact configuration and versions),
``metrics.csv`` and ``metrics.jsonl`` (one row per epoch) and ``checkpoint.pt`` (written
atomically before the first epoch and after every epoch). The data order of epoch e
depends only on (seed, e), and the checkpoint carries every RNG state, so ``resume=True``
after a kill or Ctrl-C ends bit-identical to an uninterrupted run. Checkpoints hold only
tensors, numbers, strings, lists and dicts and are read with ``weights_only=True``
(:func:`read_checkpoint`), so a crafted file cannot run code.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed, stats
from . import nn as pnn
from .convert import convert
from .data import INPUT_SHAPE, NUM_CLASSES, canonical_name, load_dataset
from .models import build_model
from .optim import SGD
from .policy import STAGES, Policy

CHECKPOINT = "checkpoint.pt"
IMAGE_MODELS = ("lenet5", "cifarnet", "mlp", "resnet20")
METRIC_FIELDS = ("epoch", "lr", "train_loss", "test_loss", "top1", "topk", "k", "nar", "saturation", "seconds")


def check_field_types(config: Any) -> None:
    """Check each field of a config dataclass against its annotation (int, float, str or
    dict, optionally ``| None``), naming the field; ints become floats in float fields."""
    for f in fields(config):
        value = getattr(config, f.name)
        kind, _, optional = str(f.type).partition(" | ")
        if value is None and optional:
            continue
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "dict": isinstance(value, dict)}[kind]
        if not ok:
            allowed = {"int": "an integer", "float": "a number", "str": "a string", "dict": "a dict"}[kind]
            raise ValueError(f"{f.name} must be {allowed}{' or None' if optional else ''}, "
                             f"got {value!r} ({type(value).__name__})")
        if kind == "float":
            setattr(config, f.name, float(value))


@dataclass
class TrainConfig:
    """One training run; the defaults are the paper's recipe (LeNet-5, Fashion-MNIST,
    posit8-O16-L16q, batch 64, SGD lr 1/16 momentum 0.5, lr halved every 4 epochs, 10 epochs).

    ``policy`` is kept as given (a recipe or a .toml path, for display); ``policy_spec`` is
    the resolved policy (:meth:`Policy.to_dict`) that a run started from a policy file
    stores, so editing or deleting the file later changes neither eval nor resume.
    """

    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    policy: str = "posit8-O16-L16q"
    epochs: int = 10
    batch_size: int = 64
    test_batch_size: int = 1024
    lr: float = 1 / 16
    momentum: float = 0.5
    lr_step: int = 4
    lr_gamma: float = 0.5
    seed: int = 0
    subset: int | None = None
    data_dir: str | None = None
    topk: int = 5
    threads: int | None = None
    policy_spec: dict | None = None

    def __post_init__(self) -> None:
        # The one place a config is checked, whether it comes from the CLI, a TOML file or a
        # checkpoint: types first (so a range check never meets a str), then ranges.
        check_field_types(self)
        for name in ("epochs", "batch_size", "test_batch_size", "lr_step", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("subset", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None: the default), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise ValueError(f"momentum must be a finite number >= 0, got {self.momentum}")
        if not (math.isfinite(self.lr_gamma) and 0 < self.lr_gamma <= 1):
            raise ValueError(f"lr_gamma must be a finite number in (0, 1], got {self.lr_gamma}")
        if self.model.lower().replace("-", "").replace("_", "") not in IMAGE_MODELS:
            raise ValueError(f"model {self.model!r} is not an image model; choose one of {', '.join(IMAGE_MODELS)} "
                             f"(the character GPT trains with --model gpt --dataset tinyshakespeare)")
        self.resolved_policy()  # fail early, naming the bad part

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"a config must be a dict of TrainConfig fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**d)

    def resolved_policy(self) -> Policy:
        """The run's policy: the stored copy when there is one, else ``policy`` itself."""
        return Policy.from_dict(self.policy_spec) if self.policy_spec is not None else Policy.load(self.policy)

    def pinned(self) -> "TrainConfig":
        """This config with a policy file's content stored in ``policy_spec`` (recipes
        describe themselves; a file can change or vanish after the run has started)."""
        if self.policy_spec is None and self.policy.strip().lower().endswith(".toml"):
            return replace(self, policy_spec=self.resolved_policy().to_dict())
        return self


# Not part of a run's identity: a resumed run may train longer, on other threads, or read
# the same data from another folder.
RESUMABLE = ("epochs", "threads", "data_dir")


def resume_config(saved: TrainConfig, changes: Mapping[str, Any], where: str | os.PathLike = "the run") -> TrainConfig:
    """``saved`` with ``changes`` applied, when they only touch :data:`RESUMABLE` fields;
    any other change raises ValueError naming the option, the saved and the new value."""
    bad = [f"{k} differs (saved {getattr(saved, k)!r}, given {v!r})" for k, v in changes.items()
           if k not in RESUMABLE and v != getattr(saved, k)]
    if bad:
        raise ValueError(f"cannot resume {where}: {'; '.join(bad)}; only {', '.join(RESUMABLE)} may change "
                         f"(start a new run with another --out for the rest)")
    return replace(saved, **{k: v for k, v in changes.items() if k in RESUMABLE})


def is_float(policy: Policy | str) -> bool:
    """True for the plain float32 baseline: torch layers, log_softmax + nll_loss, torch SGD."""
    p = Policy.load(policy)
    return not p.layers and all(getattr(p, s) is None for s in STAGES)


@dataclass
class Run:
    """Everything a run trains and evaluates."""

    config: TrainConfig
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    train_set: torch.utils.data.TensorDataset
    test_set: torch.utils.data.TensorDataset


def _subset(ds, n: int | None):
    if n is None or n >= len(ds):
        return ds
    return torch.utils.data.TensorDataset(*(t[:n] for t in ds.tensors))


def _image_model(config: TrainConfig) -> nn.Module:
    """The seeded float model of an image run, shaped for its data set's input."""
    canon = canonical_name(config.dataset)
    channels, h, w = INPUT_SHAPE[canon]
    extra = {"lenet5": {"in_channels": channels}, "resnet20": {"in_channels": channels},
             "mlp": {"in_features": channels * h * w}}.get(config.model.lower(), {})
    torch.manual_seed(config.seed)
    return build_model(config.model, num_classes=NUM_CLASSES[canon], **extra)


def build(config: TrainConfig) -> Run:
    """Data, model (seeded float initialisation, then converted by the policy), loss,
    optimizer and the step learning-rate schedule of a run."""
    if config.threads:
        import numba

        torch.set_num_threads(config.threads)
        numba.set_num_threads(min(config.threads, numba.config.NUMBA_NUM_THREADS))
    train_set = _subset(load_dataset(config.dataset, "train", config.data_dir), config.subset)
    test_set = _subset(load_dataset(config.dataset, "test", config.data_dir), config.subset)
    model = _image_model(config)
    policy = config.resolved_policy()
    if is_float(policy):
        loss_fn = lambda logits, y: F.nll_loss(F.log_softmax(logits, dim=1), y)  # noqa: E731
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    else:
        model = convert(model, policy)
        loss_fn = pnn.CrossEntropyLoss(policy)
        optimizer = SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    return Run(config, model, loss_fn, optimizer, scheduler, train_set, test_set)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 1024, topk: int = 5) -> dict[str, float]:
    """Mean cross-entropy (computed in float64 from the logits) and top-1 / top-k accuracy in %."""
    model.eval()
    n, loss_sum, correct1, correctk = 0, 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        x, y = (t[start:start + batch_size] for t in dataset.tensors)
        logits = model(x).double()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(topk, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correctk += int((top == y[:, None]).any(dim=1).sum())
        n += len(y)
    return {"loss": loss_sum / n, "top1": 100.0 * correct1 / n, "topk": 100.0 * correctk / n, "k": min(topk, logits.shape[1])}


def _versions() -> dict[str, str]:
    import numba

    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses.
    return {"positnn": str(__version__), "torch": str(torch.__version__), "numba": str(numba.__version__),
            "python": sys.version.split()[0], "platform": platform.platform()}


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_metrics(out: Path, history: list[dict], columns: tuple[str, ...] = METRIC_FIELDS) -> None:
    """``metrics.csv`` and ``metrics.jsonl`` of a run, each replaced atomically."""
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, out / "metrics.jsonl")


def train(config: TrainConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = print, stop_after: int | None = None) -> list[dict]:
    """Train ``config`` into the run directory ``out`` and return the per-epoch metrics.

    ``resume=True`` continues from ``out/checkpoint.pt``; ``config`` may then differ from
    the run's own only in :data:`RESUMABLE` fields. Without it ``out`` must be empty or
    new. ``stop_after`` ends the call after that many epochs of this invocation, leaving a
    resumable run (used by tests to stand for a kill). Ctrl-C likewise leaves the last
    completed epoch resumable (a checkpoint is written before the first epoch too).

    Inside ``positnn.distributed.reducing(reducer)`` (``torchrun ... -m positnn train``)
    each rank trains on its share of every global batch (``batch_size`` is the global
    batch); every rank checks ``out`` and reads the checkpoint, only rank 0 writes and
    logs. A checkpoint does not depend on the world size, so a run resumes on any number
    of processes.
    """
    reducer = distributed.active()
    lead = reducer is None or reducer.rank == 0
    if reducer is not None and reducer.world > 1 and is_float(config.resolved_policy()):
        raise ValueError("the float32 baseline trains torch's own layers, which positnn.distributed does not reduce; "
                         "run it in one process, or with torch's DistributedDataParallel")
    if not lead:
        log, progress = (lambda _msg: None), False
    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {out}")
        saved, ckpt = read_checkpoint(ckpt_path, resume=True)
        changes = asdict(config)
        if config.policy_spec is None:
            del changes["policy_spec"]  # a config built from a file name: the run's stored copy applies
        config = resume_config(saved, changes, out)
        run = build(config)
        try:
            _load_state(run, ckpt)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{ckpt_path}: the saved state does not fit the run's model and optimizer: {e}") from e
        history, start_epoch = ckpt["history"], ckpt["epoch"]
        log(f"resuming {out} after epoch {start_epoch}")
    else:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if ckpt_path.exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or --out for a new one")
        # Never write over files that are not a run of ours (config.json, metrics.csv, notes).
        present = sorted(p.name for p in out.iterdir()) if out.exists() else []
        if present:
            names = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise ValueError(f"--out {out} is not empty ({names}) and holds no run to resume; "
                             f"give an empty or new folder")
        config = config.pinned()
        run = build(config)
        history, start_epoch = [], 0
        if reducer is not None:
            reducer.barrier()  # every rank has checked ``out`` before rank 0 writes into it
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({"config": asdict(config), "versions": _versions()}, indent=2))
            # An epoch-0 checkpoint: a run stopped in its first epoch is resumable too.
            _atomic_save(_state(run, 0, history), ckpt_path)

    done = 0
    try:
        for epoch in range(start_epoch, config.epochs):
            if stop_after is not None and done >= stop_after:
                break
            row = _train_epoch(run, epoch, progress)
            history.append(row)
            if lead:
                _atomic_save(_state(run, epoch + 1, history), ckpt_path)
                write_metrics(out, history)
            log(_summary(row, config.epochs))
            done += 1
    except KeyboardInterrupt:
        log(f"interrupted: {out} holds {len(history)} completed epoch(s); continue with --resume")
        raise
    return history


def _train_epoch(run: Run, epoch: int, progress: bool) -> dict:
    cfg = run.config
    model = run.model
    model.train()
    stats.reset(model)
    x_all, y_all = run.train_set.tensors
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    nbatches = -(-len(order) // cfg.batch_size)
    lr = run.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    loss_sum, seen = 0.0, 0
    bar = tqdm(range(nbatches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress,
               leave=False, dynamic_ncols=True)
    reducer = distributed.active()
    for b in bar:
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = len(idx)
        if reducer is not None:  # this rank's share; the loss value is the global batch's
            idx = idx[distributed.shard(batch, reducer.rank, reducer.world)]
        x, y = x_all[idx], y_all[idx]
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.loss_fn(model(x), y)
        loss.backward()
        run.optimizer.step()
        loss_value = float(loss.detach())
        loss_sum += loss_value * batch
        seen += batch
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    run.scheduler.step()
    seconds = time.perf_counter() - t0
    counts = stats.total(model)
    if reducer is not None:  # counted on every rank's share (replicated G/O values once per rank)
        counts = dict(zip(counts, distributed.global_counts(*counts.values())))
    # Every rank evaluates the whole test set on the same weights: equal, exact results.
    test = evaluate(model, run.test_set, cfg.test_batch_size, cfg.topk)
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1), "test_loss": test["loss"],
            "top1": test["top1"], "topk": test["topk"], "k": test["k"], "nar": counts["nar"],
            "saturation": counts["saturation"], "seconds": round(seconds, 3)}


def _summary(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:>2}/{epochs}  train loss {row['train_loss']:.4f}  test loss {row['test_loss']:.4f}  "
            f"top-1 {row['top1']:.2f}%  top-{row['k']} {row['topk']:.2f}%  NaR {row['nar']}  "
            f"saturated {row['saturation']}  {row['seconds']:.1f} s")


def _state(run: Run, epoch: int, history: list[dict]) -> dict:
    return {"epoch": epoch, "config": asdict(run.config), "history": history, "versions": _versions(),
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}


# What every checkpoint holds, and what resuming needs besides.
CHECKPOINT_KEYS = ("config", "model")
RESUME_KEYS = ("epoch", "history", "optimizer", "scheduler", "torch_rng")


def read_checkpoint(path: str | os.PathLike, *, resume: bool = False) -> tuple[TrainConfig, dict]:
    """The config and contents of a positnn checkpoint, read with ``weights_only=True`` (a
    checkpoint holds only tensors, numbers, strings, lists and dicts, so a crafted file
    cannot run code). Anything else raises ValueError naming ``path`` and what is wrong;
    a missing file raises FileNotFoundError."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path} is not a positnn checkpoint: the file is empty")
    try:
        ckpt = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's weights-only message is mostly boilerplate; one line names what was refused
        # (without torch's advice on allow-listing it, which is not for untrusted files).
        refused = next((line for line in lines if "GLOBAL" in line or line.startswith("WeightsUnpickler error")), None)
        if refused is not None:
            raise ValueError(f"{path} holds objects other than tensors, numbers, strings, lists and dicts and is "
                             f"not loaded ({refused.split(' Please use')[0]})") from e
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"{path} is not a readable torch checkpoint (damaged, truncated or another kind of file; "
                         f"{reason})") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a positnn checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a {'resumable ' if resume else ''}positnn checkpoint: "
                         f"it lacks {', '.join(map(repr, missing))} (has {sorted(map(str, ckpt))})")
    try:
        config = TrainConfig.from_dict(ckpt["config"])
    except ValueError as e:
        raise ValueError(f"{path}: bad config in the checkpoint: {e}") from e
    if resume and not (isinstance(ckpt["epoch"], int) and isinstance(ckpt["history"], list)
                       and 0 <= ckpt["epoch"] == len(ckpt["history"])):
        raise ValueError(f"{path}: epoch {ckpt['epoch']!r} does not match its history of "
                         f"{len(ckpt['history']) if isinstance(ckpt['history'], list) else ckpt['history']!r} rows")
    return config, ckpt


def _load_state(run: Run, ckpt: dict) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["torch_rng"])


def load_model(checkpoint: str | os.PathLike) -> tuple[nn.Module, TrainConfig]:
    """The trained model of a checkpoint, and its config."""
    config, ckpt = read_checkpoint(checkpoint)
    model = _image_model(config)
    policy = config.resolved_policy()
    if not is_float(policy):
        model = convert(model, policy)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"{checkpoint}: the saved weights do not fit a {config.model} with {config.policy}: "
                         f"{e}") from e
    return model, config
