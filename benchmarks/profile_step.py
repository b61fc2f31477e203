"""Where a LeNet-5 training step goes: the torch profiler's table over a few steps of a
policy (batch 64, synthetic images quantised to 8-bit pixels), after warm-up steps.

    python benchmarks/profile_step.py --policy posit8-O16-L16q --threads 1
"""

from __future__ import annotations

import argparse

import numba
import torch

import positnn.nn as pnn
from positnn import optim
from positnn.convert import convert
from positnn.models import lenet5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="posit8-O16-L16q")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20, help="table rows (default 20)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, 1, 28, 28, generator=g) * 255).round() / 255
    y = torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    model = convert(lenet5(), args.policy)
    loss_fn, opt = pnn.CrossEntropyLoss(args.policy), optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    with torch.profiler.profile() as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
