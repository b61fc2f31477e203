"""Train LeNet-5 for one epoch with a policy and print a digest of the final weights.

Two positnn versions are bit-identical on the paper's recipe when they print the same
digest: run this script from each checkout (PYTHONPATH=<checkout>).

    python benchmarks/lenet_epoch_digest.py --data-dir ../shared/data --dataset fashion-mnist
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from positnn.train import TrainConfig, _train_epoch, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policy", default="posit8-O16-L16q")
    ap.add_argument("--subset", type=int, default=None, help="first N training images (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, policy=args.policy, subset=args.subset,
                      epochs=1, threads=args.threads, test_batch_size=1024)
    run = build(cfg)
    t0 = time.perf_counter()
    row = _train_epoch(run, 0, progress=False)
    digest = hashlib.sha256()
    for name, t in sorted(run.model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            digest.update(name.encode())
            digest.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    print(f"{args.policy} {args.dataset} 1 epoch: top-1 {row['top1']:.2f}%  train {row['seconds']:.1f} s  "
          f"(wall {time.perf_counter() - t0:.1f} s)  weights sha256 {digest.hexdigest()}")


if __name__ == "__main__":
    main()
