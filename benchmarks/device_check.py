"""The GPU figures of issue 13, in one run: posit round throughput against ``clone()``,
the exact quire matmul against ``fmt.round(float32 matmul)`` and float32 matmul (LeNet,
ResNet-20 and GPT shapes, and 4096^3), and LeNet-5 / ResNet-20 training steps per second
(posit8-O16-L16q against float32 torch, synthetic batches). Every section prints its own
error and the run goes on, so one failure does not cost the others.

    python benchmarks/device_check.py --device cuda           # on a GPU (device_check.sh)
    python benchmarks/device_check.py --device cpu --tiny     # the dry run: Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run through Triton's interpreter")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and one repeat (a dry run of the script itself)")
    ap.add_argument("--repeats", type=int, default=10)
    return ap.parse_args(argv)


ARGS = _parse(sys.argv[1:])
if ARGS.device == "cpu":  # before positnn's Triton kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["POSITNN_BACKEND"] = "triton"

import torch  # noqa: E402

import positnn  # noqa: E402
import positnn.nn as pnn  # noqa: E402
from positnn import Posit, optim, quire  # noqa: E402
from positnn.convert import convert  # noqa: E402
from positnn.models import lenet5, resnet20  # noqa: E402

DEV = torch.device(ARGS.device)
REPEATS = 1 if ARGS.tiny else ARGS.repeats
# (name, M, K, N): a (M, K) @ b (K, N)
SHAPES = [
    ("LeNet conv2 fwd", 64 * 100, 150, 16), ("LeNet conv3 grad_in", 64 * 25, 3000, 16), ("LeNet fc1 fwd", 64, 120, 84),
    ("ResNet-20 layer1 fwd", 128 * 1024, 144, 16), ("ResNet-20 layer3 fwd", 128 * 64, 576, 64),
    ("ResNet-20 layer3 grad_w", 64, 128 * 64, 576),
    ("GPT qkv", 64 * 64, 128, 384), ("GPT mlp up", 64 * 64, 128, 512), ("GPT mlp down", 64 * 64, 512, 128),
    ("GPT lm head", 64 * 64, 128, 65), ("4096^3", 4096, 4096, 4096),
]


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, repeats: int = REPEATS) -> float:
    """Median wall time of fn() after one warm-up call (compilation), synchronised."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def section(title):
    def wrap(fn):
        def run():
            print(f"\n== {title}", flush=True)
            try:
                fn()
            except Exception:  # report and go on: one GPU run must give every figure it can
                traceback.print_exc(file=sys.stdout)
        return run
    return wrap


@section("round throughput vs clone()")
def round_throughput() -> None:
    n = 1 << (12 if ARGS.tiny else 26)
    x = torch.randn(n, device=DEV)
    t_clone = seconds(lambda: x.clone())
    for fmt in (Posit(8, 2), Posit(16, 1), Posit(32, 2)):
        t = seconds(lambda: fmt.round(x))
        out_bytes = n * fmt.dtype.itemsize
        print(f"{str(fmt):12s} round {n * 4 / t / 1e9 + out_bytes / t / 1e9:8.1f} GB/s   clone {8 * n / t_clone / 1e9:8.1f} GB/s"
              f"   round/clone bandwidth {(n * 4 + out_bytes) / t / (8 * n / t_clone):6.1%}")


@section("exact quire matmul vs fmt.round(float32 matmul) vs float32 matmul")
def quire_matmul() -> None:
    fmt = Posit(8, 2)
    g = torch.Generator(device=DEV).manual_seed(0)
    print(f"{'shape':26s} {'M x K x N':>20s} {'exact ms':>10s} {'round(f32) ms':>14s} {'f32 ms':>8s} {'exact/round':>11s} {'exact/f32':>9s}")
    for name, M, K, N in SHAPES:
        if ARGS.tiny:
            M, K, N = max(M // 256, 2), max(K // 64, 2), max(N // 16, 2)
        a = fmt.round(torch.randn(M, K, device=DEV, generator=g))
        b = fmt.round(torch.randn(K, N, device=DEV, generator=g) / K**0.5)
        te = seconds(lambda: quire.matmul(a, b, fmt))
        tr = seconds(lambda: fmt.round(a @ b))
        tf = seconds(lambda: a @ b)
        print(f"{name:26s} {f'{M}x{K}x{N}':>20s} {te * 1e3:10.3f} {tr * 1e3:14.3f} {tf * 1e3:8.3f} {te / tr:11.2f} {te / tf:9.2f}")


def train_steps(make, shape, classes: int, batch: int, steps: int) -> None:
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(batch, *shape, device=DEV, generator=g)
    y = torch.randint(0, classes, (batch,), device=DEV, generator=g)
    base = make().to(DEV)
    rates = {}
    for name in ("float32-torch", "posit8-O16-L16q"):
        if name == "float32-torch":
            model = make().to(DEV)
            model.load_state_dict(base.state_dict())
            loss_fn, opt = torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)
        else:
            model = convert(base, name)
            loss_fn, opt = pnn.CrossEntropyLoss(name), optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

        rates[name] = 1 / seconds(step, steps)
        print(f"{name:18s} {rates[name]:9.2f} steps/s", flush=True)
    print(f"posit8-O16-L16q step time / float32 step time: {rates['float32-torch'] / rates['posit8-O16-L16q']:.2f}x")


@section("LeNet-5 training steps/s (batch 64, 1x28x28)")
def lenet_training() -> None:
    train_steps(lenet5, (1, 28, 28), 10, 4 if ARGS.tiny else 64, 1 if ARGS.tiny else 20)


@section("ResNet-20 training steps/s (batch 128, 3x32x32)")
def resnet_training() -> None:
    train_steps(resnet20, (3, 32, 32), 10, 2 if ARGS.tiny else 128, 1 if ARGS.tiny else 10)


def main() -> None:
    name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "CPU (Triton interpreter: no GPU figures)"
    print(f"device {name}; torch {torch.__version__}; positnn backend {positnn.backend(DEV)}")
    for run in (round_throughput, quire_matmul, lenet_training, resnet_training):
        run()


if __name__ == "__main__":
    main()
