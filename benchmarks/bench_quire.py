"""Price of exactness: quire.matmul(mode="exact") against fake quantisation
(fmt.round(torch.matmul(a32, b32))) and bare float32 torch.matmul, on the GEMMs that
LeNet-5 and CifarNet training issue at batch 64 (forward, input error, weight gradient;
convolutions via unfold), then on their convolutions as training runs them (quire.conv2d
and its gradients, against fmt.round of torch's float32 convolution). Timings are medians;
compare the ratios, measured in one run.
"""

import argparse
import statistics
import time

import numba
import torch

from positnn import Posit, quire
from positnn.quire import _scan, _widths

# (name, M, K, N, role of a, role of b): a (M, K) @ b (K, N)
LENET = [
    ("conv1 fwd", 64 * 784, 25, 6, "act", "weight"),
    ("conv1 grad_w", 6, 64 * 784, 25, "grad", "act"),
    ("conv2 fwd", 64 * 100, 150, 16, "act", "weight"),
    ("conv2 grad_in", 64 * 196, 400, 6, "grad", "weight"),
    ("conv2 grad_w", 16, 64 * 100, 150, "grad", "act"),
    ("conv3 fwd", 64, 400, 120, "act", "weight"),
    ("conv3 grad_in", 64 * 25, 3000, 16, "grad", "weight"),
    ("conv3 grad_w", 120, 64, 400, "grad", "act"),
    ("fc1 fwd", 64, 120, 84, "act", "weight"),
    ("fc1 grad_in", 64, 84, 120, "grad", "weight"),
    ("fc1 grad_w", 84, 64, 120, "grad", "act"),
    ("fc2 fwd", 64, 84, 10, "act", "weight"),
    ("fc2 grad_in", 64, 10, 84, "grad", "weight"),
    ("fc2 grad_w", 10, 64, 84, "grad", "act"),
]
CIFARNET = [
    ("conv1 fwd", 64 * 1024, 75, 8, "act", "weight"),
    ("conv1 grad_w", 8, 64 * 1024, 75, "grad", "act"),
    ("conv2 fwd", 64 * 256, 200, 16, "act", "weight"),
    ("conv2 grad_in", 64 * 256, 400, 8, "grad", "weight"),
    ("conv2 grad_w", 16, 64 * 256, 200, "grad", "act"),
    ("fc1 fwd", 64, 1024, 384, "act", "weight"),
    ("fc1 grad_in", 64, 384, 1024, "grad", "weight"),
    ("fc1 grad_w", 384, 64, 1024, "grad", "act"),
    ("fc2 fwd", 64, 384, 192, "act", "weight"),
    ("fc2 grad_in", 64, 192, 384, "grad", "weight"),
    ("fc2 grad_w", 192, 64, 384, "grad", "act"),
    ("fc3 fwd", 64, 192, 10, "act", "weight"),
    ("fc3 grad_in", 64, 10, 192, "grad", "weight"),
    ("fc3 grad_w", 10, 64, 192, "grad", "act"),
]
FORMATS = [Posit(8, 0), Posit(8, 1), Posit(8, 2), Posit(16, 1), Posit(16, 2), Posit(32, 2)]
# The convolutions as training runs them (quire.conv2d and its two gradients, whatever plan
# they pick): (name, input shape, output channels, kernel, padding).
LENET_CONVS = [("conv1", (64, 1, 28, 28), 6, 5, 2), ("conv2", (64, 6, 14, 14), 16, 5, 0), ("conv3", (64, 16, 5, 5), 120, 5, 0)]
CIFARNET_CONVS = [("conv1", (64, 3, 32, 32), 8, 5, 2), ("conv2", (64, 8, 16, 16), 16, 5, 2)]


def draw(role: str, shape: tuple[int, int], fan_in: int, g: torch.Generator) -> torch.Tensor:
    """Values drawn like real tensors, spread over several binades."""
    x = torch.randn(shape, generator=g)
    if role == "act":  # ReLU outputs: half zeros, the rest log-spread around 1
        return torch.relu(x) * torch.exp2(torch.randn(shape, generator=g) * 1.5)
    if role == "weight":
        return (torch.rand(shape, generator=g) * 2 - 1) / fan_in**0.5
    return x * 1e-3 * torch.exp2(torch.randn(shape, generator=g) * 2)  # gradients


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slice_gemms(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many float64 slice GEMMs the exact product needs (P * Q)."""
    span_a = _scan(a.unsqueeze(0))[2]
    span_b = _scan(b.t().unsqueeze(0))[2]
    wa, wb = _widths(span_a, span_b, 53 - max(b.shape[0] - 1, 0).bit_length(), a.numel(), b.numel(), a.shape[0] * b.shape[1])
    return max(1, -(-span_a // wa)) * max(1, -(-span_b // wb))


def run(net: str, shapes, fmt: Posit, repeats: int, none: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    tot = {"exact": 0.0, "fake": 0.0, "f32": 0.0, "none": 0.0}
    none = none and fmt.nbits <= 8  # wider formats have no tables: the float kernel, far slower
    gemms = []
    for name, M, K, N, ra, rb in shapes:
        a = fmt.round(draw(ra, (M, K), K, g)).float()
        b = fmt.round(draw(rb, (K, N), K, g)).float()
        tot["exact"] += median_seconds(lambda: quire.matmul(a, b, fmt), repeats)
        if none:
            tot["none"] += median_seconds(lambda: quire.matmul(a, b, fmt, mode="none"), repeats)
        tot["fake"] += median_seconds(lambda: fmt.round(torch.matmul(a, b)), repeats)
        tot["f32"] += median_seconds(lambda: torch.matmul(a, b), repeats)
        gemms.append(slice_gemms(a, b))
    print(
        f"{net:9} {str(fmt):12} exact {tot['exact'] * 1e3:8.1f} ms  fake-quant {tot['fake'] * 1e3:7.1f} ms  "
        f"float32 {tot['f32'] * 1e3:6.1f} ms  exact/fake {tot['exact'] / tot['fake']:5.2f}  "
        f"exact/f32 {tot['exact'] / tot['f32']:6.1f}  float64 GEMMs per shape {gemms}"
        + (f"  none {tot['none'] * 1e3:7.1f} ms  none/exact {tot['none'] / tot['exact']:5.2f}" if none else "")
    )


def run_convs(net: str, convs, fmt: Posit, repeats: int) -> None:
    """The training path: each convolution's forward, input error (not for a first layer)
    and weight gradient through the quire, against fmt.round of the float32 torch op."""
    g = torch.Generator().manual_seed(0)
    tot = {"exact": 0.0, "fake": 0.0, "f32": 0.0}
    for name, shape, out, k, pad in convs:
        x = fmt.round(draw("act", shape, 1, g)).float()
        w = fmt.round(draw("weight", (out, shape[1], k, k), shape[1] * k * k, g)).float()
        y = torch.nn.functional.conv2d(x, w, None, 1, pad)
        d = fmt.round(draw("grad", tuple(y.shape), 1, g)).float()
        ops = {
            "exact": [lambda: quire.conv2d(x, w, None, fmt, 1, pad), lambda: quire.conv2d_weight_grad(x, d, w.shape, fmt, 1, pad)],
            "f32": [lambda: torch.nn.functional.conv2d(x, w, None, 1, pad),
                    lambda: torch.nn.grad.conv2d_weight(x, w.shape, d, 1, pad)],
        }
        if name != "conv1":
            ops["exact"].append(lambda: quire.conv2d_input_grad(d, w, x.shape, fmt, 1, pad))
            ops["f32"].append(lambda: torch.nn.grad.conv2d_input(x.shape, w, d, 1, pad))
        ops["fake"] = [lambda f=f: fmt.round(f()) for f in ops["f32"]]
        for kind, fns in ops.items():
            tot[kind] += sum(median_seconds(f, repeats) for f in fns)
    print(f"{net:9} {str(fmt):12} convolutions as trained: exact {tot['exact'] * 1e3:7.1f} ms  fake-quant "
          f"{tot['fake'] * 1e3:6.1f} ms  float32 {tot['f32'] * 1e3:6.1f} ms  exact/fake {tot['exact'] / tot['fake']:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch and numba threads (default: all cores)")
    parser.add_argument("--none", action="store_true", help="also time mode='none' (no quire) for formats of <= 8 bits")
    parser.add_argument("--formats", nargs="+", default=None, help="e.g. 'posit(8,2)' 'posit(16,2)' (default: all six)")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sums over each network's GEMMs, medians of {args.repeats}")
    formats = [Posit.parse(f) for f in args.formats] if args.formats else FORMATS
    for net, shapes in (("LeNet-5", LENET), ("CifarNet", CIFARNET)):
        for fmt in formats:
            run(net, shapes, fmt, args.repeats, args.none)
    for net, convs in (("LeNet-5", LENET_CONVS), ("CifarNet", CIFARNET_CONVS)):
        for fmt in formats:
            run_convs(net, convs, fmt, args.repeats)


if __name__ == "__main__":
    main()
