"""100 MNIST steps of LeNet-5 in posit8-O16-L16q with each way of writing the loss.

Before the gradient contract, torch's loss (or positnn's loss without a policy) left the
posit model's gradients N times too small: 10% accuracy after 100 steps. Prints the test
top-1 on the first 2,000 test images for float32 torch and for each loss.

    python benchmarks/loss_contract.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from positnn import Policy, convert
from positnn import nn as pnn
from positnn.data import load_dataset
from positnn.models import lenet5
from positnn.optim import SGD
from positnn.train import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("mnist", "train", args.data_dir), load_dataset("mnist", "test", args.data_dir)
    test = torch.utils.data.TensorDataset(*(t[:2000] for t in test.tensors))
    policy = Policy.parse("posit8-O16-L16q")
    losses = {"float32 torch": None, "positnn CrossEntropyLoss(policy)": pnn.CrossEntropyLoss(policy),
              "torch F.cross_entropy": F.cross_entropy, "positnn CrossEntropyLoss()": pnn.CrossEntropyLoss()}
    x_all, y_all = train.tensors
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    for name, loss_fn in losses.items():
        torch.manual_seed(0)
        model = lenet5()
        if loss_fn is None:
            opt, loss_fn = torch.optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5), F.cross_entropy
        else:
            model = convert(model, policy)
            opt = SGD(model.parameters(), lr=1 / 16, momentum=0.5)
        for b in range(args.steps):
            idx = order[b * 64:(b + 1) * 64]
            opt.zero_grad()
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
        r = evaluate(model, test, 1000, 5)
        print(f"{name:34s} last train loss {float(loss.detach()):.3f}  test loss {r['loss']:.3f}  "
              f"top-1 {r['top1']:.2f}%", flush=True)


if __name__ == "__main__":
    main()
