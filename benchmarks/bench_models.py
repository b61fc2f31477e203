"""Training-step time of whole models through the any-model engine, against float32 torch.

Times the character GPT (nanoGPT's CPU shape, batch 12 x 64 tokens, AdamW) and ResNet-20
(28x28 grayscale, batch 64, SGD) in float32 torch and in a posit policy, in the same run,
from the same initial weights and data, after warm-up steps.

    python benchmarks/bench_models.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from positnn import convert, optim
from positnn.models import gpt, resnet20


def _gpt_step(policy: str):
    torch.manual_seed(0)
    model = gpt(65)
    if policy != "float32":
        model = convert(model, policy)
    opt = (torch.optim.AdamW if policy == "float32" else optim.AdamW)(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 65, (12, 65), generator=g)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(idx[:, :64]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        opt.step()
    return step


def _resnet_step(policy: str):
    torch.manual_seed(0)
    model = resnet20(in_channels=1)
    if policy != "float32":
        model = convert(model, policy)
    opt = (torch.optim.SGD if policy == "float32" else optim.SGD)(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _time(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="posit8-O16-L16q")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"{'model':10} {'float32 ms':>11} {args.policy + ' ms':>22} {'ratio':>6}")
    for name, build in (("gpt", _gpt_step), ("resnet20", _resnet_step)):
        base = _time(build("float32"), args.warmup, args.repeats)
        posit = _time(build(args.policy), args.warmup, args.repeats)
        print(f"{name:10} {base * 1e3:11.1f} {posit * 1e3:22.1f} {posit / base:6.2f}", flush=True)


if __name__ == "__main__":
    main()
