"""Seconds per training epoch of LeNet-5 on Fashion-MNIST: posit recipes vs float32 torch.

Times whole training steps (forward, loss, backward, optimizer step) at batch 64 for
``posit8-O16-L16q`` (exact quire), ``posit8-O16-L16`` (no quire: every product and sum
rounded), posit(16,2) everywhere (with quire) and plain float32 torch, in the same run and from the same initial weights and batch order. ``--subset``
times that fraction of an epoch and extrapolates to the 60,000 images; a few warm-up
steps (numba compilation, allocator) are excluded.

    python benchmarks/bench_train.py --data-dir ../shared/data/fashion-mnist --subset 0.05
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import positnn.nn as pnn
from positnn import optim
from positnn.convert import convert
from positnn.data import load_dataset
from positnn.models import lenet5

CONFIGS = ("posit8-O16-L16q", "posit8-O16-L16", "posit(16,2)q", "float32-torch")


def _setup(name: str, base: torch.nn.Module, lr: float, momentum: float):
    if name == "float32-torch":
        model = copy.deepcopy(base)
        return model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model = convert(base, name)
    return model, pnn.CrossEntropyLoss(name), optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def time_config(name: str, base, images, labels, batches: int, batch_size: int, warmup: int) -> dict:
    """Train ``warmup`` + ``batches`` steps; return the timed seconds per step and loss."""
    model, loss_fn, opt = _setup(name, base, 1 / 16, 0.5)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    loss = None
    t0 = None
    for b in range(warmup + batches):
        if b == warmup:
            t0 = time.perf_counter()
        idx = order[(b * batch_size) % len(order):][:batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(images[idx]), labels[idx])
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / batches
    return {"config": name, "s_per_batch": seconds, "loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    ap.add_argument("--subset", type=float, default=0.05, help="fraction of an epoch to time (default 0.05)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for torch and for the numba kernels (default: their own defaults)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"default: {' '.join(CONFIGS)}")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    train = load_dataset("fashion-mnist", "train", args.data_dir)
    images, labels = train.tensors
    per_epoch = -(-len(labels) // args.batch_size)
    batches = max(1, round(per_epoch * args.subset))
    torch.manual_seed(0)
    base = lenet5()
    rows = [time_config(c, base, images, labels, batches, args.batch_size, args.warmup) for c in args.configs]
    ref = next((r["s_per_batch"] for r in rows if r["config"] == "float32-torch"), None)
    import numba

    print(f"LeNet-5, Fashion-MNIST, batch {args.batch_size}, {batches} timed batches of {per_epoch} per epoch, "
          f"{torch.get_num_threads()} torch / {numba.get_num_threads()} numba threads")
    print(f"{'config':18} {'ms/batch':>9} {'s/epoch':>9} {'x float32':>10}")
    for r in rows:
        r["s_per_epoch"] = r["s_per_batch"] * per_epoch
        r["vs_float32"] = r["s_per_batch"] / ref if ref else None
        ratio = f"{r['vs_float32']:.2f}" if ref else "-"
        print(f"{r['config']:18} {1e3 * r['s_per_batch']:9.1f} {r['s_per_epoch']:9.1f} {ratio:>10}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"batches": batches, "per_epoch": per_epoch, "threads": torch.get_num_threads(), "rows": rows},
                      fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
