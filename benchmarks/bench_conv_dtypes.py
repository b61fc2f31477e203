"""torch's float32 against its float64 convolutions on LeNet-5 and ResNet-20 shapes
(batch 64): the forward, the input gradient and the weight gradient, as ratios measured in
one run. These ratios set when the exact quire slices a convolution into float32 pairs
instead of running it in float64 (``positnn.quire.FLOAT32_ADVANTAGE``).

    python benchmarks/bench_conv_dtypes.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (input channels, output channels, height = width, kernel, padding)
SHAPES = [(1, 6, 28, 5, 2), (6, 16, 14, 5, 0), (16, 120, 5, 5, 0),  # LeNet-5
          (1, 16, 28, 3, 1), (16, 16, 28, 3, 1), (32, 32, 14, 3, 1), (64, 64, 7, 3, 1)]  # ResNet-20


def _ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); float64 ms / float32 ms for each op")
    print(f"{'C':>3} {'O':>4} {'H':>3} {'k':>2} {'forward':>9} {'input grad':>11} {'weight grad':>12}")
    for c, o, h, k, pad in SHAPES:
        ms = {}
        for dt in (torch.float32, torch.float64):
            x, w = torch.randn(64, c, h, h, dtype=dt), torch.randn(o, c, k, k, dtype=dt)
            g = torch.randn_like(F.conv2d(x, w, padding=pad))
            with torch.backends.nnpack.flags(enabled=False):  # as the quire runs them
                ms[dt] = [_ms(lambda: F.conv2d(x, w, padding=pad), args.repeats),
                          _ms(lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=pad), args.repeats),
                          _ms(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=pad), args.repeats)]
        r = [a / b for a, b in zip(ms[torch.float64], ms[torch.float32])]
        print(f"{c:3} {o:4} {h:3} {k:2} {r[0]:8.1f}x {r[1]:10.1f}x {r[2]:11.1f}x")


if __name__ == "__main__":
    main()
