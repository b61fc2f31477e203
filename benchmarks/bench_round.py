"""Throughput of Posit.round and Float.round on 16M-element tensors, next to tensor.clone() of the same
tensor in the same run (timings here are noisy: compare the ratio, not the absolute)."""

import argparse
import statistics
import time

import numba
import torch

from positnn import Float, Posit

FORMATS = [Posit(8, 0), Posit(8, 1), Posit(8, 2), Posit(16, 1), Posit(16, 2), Posit(32, 2)]
FORMATS += [Float.parse(name) for name in ("fp8e4m3", "fp8e5m2", "fp16", "bf16", "fp32")] + [Float(10, 51)]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and numba compilation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch and numba threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.numel:,} elements, median of {args.repeats}")
    print(f"{'input':8} {'op':14} {'M elem/s':>10} {'vs clone':>9}")
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(args.numel, dtype=dtype) * torch.exp2(torch.randint(-20, 20, (args.numel,)).to(dtype))
        clone = args.numel / median_seconds(x.clone, args.repeats)
        print(f"{str(dtype)[6:]:8} {'clone':14} {clone / 1e6:10.0f} {1.0:9.2f}")
        for fmt in FORMATS:
            rate = args.numel / median_seconds(lambda: fmt.round(x), args.repeats)
            print(f"{str(dtype)[6:]:8} {str(fmt):14} {rate / 1e6:10.0f} {rate / clone:9.2f}")


if __name__ == "__main__":
    main()
