"""Step time and bytes communicated per step of data-parallel LeNet-5 training, 1 vs 2
processes: positnn's exact quire-limb reduction (posit8-O16-L16q) against float32 torch
DistributedDataParallel, in the same run, same global batches, gloo on localhost.

Bytes are the payload each rank hands to its collectives per step (positnn: the Reducer's
count of every all-reduce and all-gather, limbs, ranges and counts included; DDP: the
gradient buckets its communication hook sees). A ring all-reduce moves about
2 (W - 1) / W times the payload per rank over the wire.

    python benchmarks/bench_distributed.py --data-dir ../shared/data/fashion-mnist --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WARMUP = 3


def _batches(labels: torch.Tensor, batch: int, steps: int) -> list[torch.Tensor]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return [order[(b * batch) % len(order):][:batch] for b in range(WARMUP + steps)]


def _time_positnn(images, labels, batches, reducer) -> dict:
    import positnn.nn as pnn
    from positnn import distributed, optim
    from positnn.convert import convert
    from positnn.models import lenet5

    torch.manual_seed(0)
    model = convert(lenet5(), "posit8-O16-L16q")
    loss_fn = pnn.CrossEntropyLoss("posit8-O16-L16q")
    opt = optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)
    with distributed.reducing(reducer):
        for b, idx in enumerate(batches):
            if b == WARMUP:
                t0 = time.perf_counter()
                sent0, calls0 = (reducer.bytes_sent, reducer.calls) if reducer else (0, 0)
            if reducer is not None:
                idx = idx[distributed.shard(len(idx), reducer.rank, reducer.world)]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(images[idx]), labels[idx]).backward()
            opt.step()
    steps = len(batches) - WARMUP
    sent, calls = ((reducer.bytes_sent - sent0), (reducer.calls - calls0)) if reducer else (0, 0)
    return {"s_per_step": (time.perf_counter() - t0) / steps, "bytes_per_step": sent / steps,
            "collectives_per_step": calls / steps}


def _time_ddp(images, labels, batches, world: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from positnn import distributed
    from positnn.models import lenet5

    torch.manual_seed(0)
    model = lenet5()
    counted = {"bytes": 0, "calls": 0}
    if world > 1:
        model = DDP(model)

        def hook(state, bucket):  # count what DDP reduces, then reduce it as DDP does
            counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            counted["calls"] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, hook)
    opt = torch.optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
    rank = torch.distributed.get_rank() if world > 1 else 0
    for b, idx in enumerate(batches):
        if b == WARMUP:
            t0, sent0, calls0 = time.perf_counter(), counted["bytes"], counted["calls"]
        idx = idx[distributed.shard(len(idx), rank, world)]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images[idx]), labels[idx]).backward()
        opt.step()
    steps = len(batches) - WARMUP
    return {"s_per_step": (time.perf_counter() - t0) / steps, "bytes_per_step": (counted["bytes"] - sent0) / steps,
            "collectives_per_step": (counted["calls"] - calls0) / steps}


def _rank(args) -> None:
    """One rank: time both trainers on this rank's shares; rank 0 writes the figures."""
    from positnn import distributed
    from positnn.data import load_dataset

    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    reducer = distributed.init_from_env() if world > 1 else None
    ds = load_dataset("fashion-mnist", "train", args.data_dir)
    images, labels = ds.tensors
    batches = _batches(labels, args.batch_size, args.steps)
    rows = [{"trainer": "positnn exact (posit8-O16-L16q)", **_time_positnn(images, labels, batches, reducer)},
            {"trainer": "float32 torch DDP", **_time_ddp(images, labels, batches, world)}]
    if reducer is None or reducer.rank == 0:
        Path(args.result).write_text(json.dumps(rows))
    distributed.shutdown()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (default 64)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps (default 20)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--result", help=argparse.SUPPRESS)  # set for the ranks by the launcher
    args = ap.parse_args(argv)
    if args.result:
        _rank(args)
        return []
    out = []
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "rows.json"
            procs = []
            for r in range(world):
                env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, __file__, "--result", str(result), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps)] + (["--data-dir", args.data_dir] if args.data_dir else [])
                procs.append(subprocess.Popen(cmd, env=env))
            if any(p.wait() for p in procs):
                raise SystemExit(f"a rank of the {world}-process run failed")
            for row in json.loads(result.read_text()):
                out.append({"processes": world, **row})
    print(f"LeNet-5, Fashion-MNIST, global batch {args.batch_size}, {args.steps} steps, 1 thread per process")
    print(f"{'processes':>9}  {'trainer':34} {'s/step':>8} {'bytes/step/rank':>16} {'collectives/step':>17}")
    for row in out:
        print(f"{row['processes']:>9}  {row['trainer']:34} {row['s_per_step']:8.4f} {row['bytes_per_step']:16.0f} "
              f"{row['collectives_per_step']:17.1f}")
    return out


if __name__ == "__main__":
    main()
