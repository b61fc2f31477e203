"""How far from summing to zero the cross-entropy gradient is once it is rounded to B.

softmax - onehot sums to 0 over the classes of each sample. Rounded to a narrow B it does
not: a posit never rounds a nonzero value to 0, so every class probability below minpos(B)
becomes minpos(B), while the target term of a confident sample is exactly 0 (s rounds to
e_t in L). The surplus pushes every logit down at every step. This trains LeNet-5 for
``--batches`` batches of epoch 1 (the training run's order) and measures that, on the next
ten batches:

    python benchmarks/loss_grad_bias.py --data-dir ../shared/data --policy posit5-O12-L12q
"""

from __future__ import annotations

import argparse

import torch

import positnn.functional as PF
from positnn.train import TrainConfig, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policy", default="posit5-O12-L12q", help="a recipe or a policy .toml")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, policy=args.policy, threads=args.threads)
    run = build(cfg)
    model, policy = run.model, cfg.resolved_policy()
    x_all, y_all = run.train_set.tensors
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(cfg.seed * 100_003))
    for b in range(args.batches):
        idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        run.optimizer.zero_grad(set_to_none=True)
        run.loss_fn(model(x_all[idx]), y_all[idx]).backward()
        run.optimizer.step()
    idx = order[args.batches * cfg.batch_size:(args.batches + 10) * cfg.batch_size]
    logits = model(x_all[idx]).detach().requires_grad_(True)
    lp = policy.for_layer("loss")
    PF.cross_entropy(logits, y_all[idx], lp).backward()
    g = logits.grad.double()
    B = lp.backward
    g_b = B.round(g, underflow=lp.underflow).double()
    target = torch.zeros_like(g, dtype=torch.bool).scatter_(1, y_all[idx][:, None], True)
    print(f"{args.policy}, after {args.batches} batches, {len(idx)} samples: mean logit {logits.mean().item():.2f}; "
          f"mean row sum of the gradient in L {g.sum(1).mean().item():.2e}, rounded to B {g_b.sum(1).mean().item():.2e}; "
          f"non-target entries below minpos(B) that B rounds up to it "
          f"{100 * ((g_b == B.minpos) & (g < B.minpos) & ~target).double().mean().item():.1f}%; "
          f"target entries that are 0 {100 * (g_b[target] == 0).double().mean().item():.1f}%")


if __name__ == "__main__":
    main()
