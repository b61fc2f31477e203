"""Where a LeNet-5 training step goes: the torch profiler's table over a few steps of a
policy (batch 64), after warm-up steps: on Fashion-MNIST batches with ``--data-dir``,
else on one batch of synthetic images quantised to 8-bit pixels. The operands' spans, and
so the exact plans taken, differ between the two: real data after some training is the
representative case. Before the table: the minimum and median of ``--steps`` steps timed
without the profiler (the minimum moves least on a shared machine), and the time per step
in each numba kernel entry point (which the torch profiler counts inside the calling op).

    python benchmarks/profile_step.py --policy posit8-O16-L16q --threads 1 --data-dir ../shared/data --warmup 60
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import numba
import torch

import positnn.nn as pnn
from positnn import optim
from positnn.backends import numba as numba_backend
from positnn.convert import convert
from positnn.data import load_dataset
from positnn.kernels import accumulate, lut
from positnn.kernels import scatter as scatter_kernels
from positnn.models import lenet5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="posit8-O16-L16q")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20, help="table rows (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default 3)")
    ap.add_argument("--data-dir", help="train on Fashion-MNIST batches from here (default: synthetic images)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    if args.data_dir:
        images, labels = load_dataset("fashion-mnist", "train", data_dir=args.data_dir).tensors
    else:
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(64, 1, 28, 28, generator=g) * 255).round() / 255
        labels = torch.randint(0, 10, (64,), generator=g)
    batches = len(images) // 64
    torch.manual_seed(0)
    model = convert(lenet5(), args.policy)
    loss_fn, opt = pnn.CrossEntropyLoss(args.policy), optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)

    def step(i: int) -> None:
        b = slice(i % batches * 64, i % batches * 64 + 64)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(images[b]), labels[b]).backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    seconds = collections.Counter()
    _time_kernels(seconds)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        times.append(time.perf_counter() - t0)
    print(f"{args.policy}: {min(times) * 1e3:.2f} ms a step (min), {statistics.median(times) * 1e3:.2f} ms (median), "
          f"{args.steps} steps")
    for name, s in seconds.most_common():
        print(f"  {name:18s} {s / args.steps * 1e3:7.3f} ms a step")
    with torch.profiler.profile() as prof:
        for i in range(args.steps):
            step(args.warmup + args.steps + i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def _time_kernels(seconds: collections.Counter) -> None:
    """Wrap the numba backend's entry points and the no-quire kernels (look-up, scatter and
    the float kernel) to add their wall time to ``seconds``."""
    entry_points = [(numba_backend, name) for name in (
        "round_nearest", "round_stochastic", "global_span", "scan_rows", "row_extent", "split_flat", "split_rows",
        "round_flat", "round_sum", "round_stack", "round_terms")]
    entry_points += [(lut, name) for name in ("f32_patterns", "lut_dot", "pattern_cols")]
    entry_points += [(scatter_kernels, name) for name in ("lut_scatter", "scatter_dot")]
    entry_points += [(accumulate, "sequential_dot")]
    for module, name in entry_points:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                seconds[_name] += time.perf_counter() - t0

        setattr(module, name, timed)


if __name__ == "__main__":
    main()
