"""A training run's trajectory batch by batch, logged as the instrumented PositNN example logs.

Every ``--every`` batches of LeNet-5 training (the training run's own order, seed and
schedule) it prints the batch's loss, the mean of its logits, their largest magnitude and
how many logits sit at +-maxpos of the forward format; after each epoch the test accuracy.
``results/divergence/PositNN-trace.patch`` makes PositNN's Fashion-MNIST example print the
same figures (its own initial weights and batch order), so the two trajectories can be set
side by side:

    python benchmarks/batch_trace.py --data-dir ../shared/data --policy posit5-O12-L12q --epochs 2
"""

from __future__ import annotations

import argparse

import torch

from positnn.train import TrainConfig, build, evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--policy", default="posit5-O12-L12q", help="a recipe or a policy .toml")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every", type=int, default=32, help="log every this many batches (PositNN: 32)")
    ap.add_argument("--seed", type=int, default=0, help="the training run's seed (initial weights, batch order)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.epochs < 1 or args.every < 1:
        ap.error(f"--epochs and --every must be at least 1, got {args.epochs} and {args.every}")
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, policy=args.policy, threads=args.threads,
                      epochs=args.epochs, seed=args.seed)
    torch.set_num_threads(args.threads)
    run = build(cfg)
    forward = cfg.resolved_policy().forward  # None for float32 training
    maxpos = float("inf") if forward is None else float(forward.maxpos)
    x_all, y_all = run.train_set.tensors
    print("epoch batch loss mean_logit max_abs_logit logits_at_maxpos", flush=True)
    for epoch in range(args.epochs):
        run.model.train()
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        for b in range(-(-len(order) // cfg.batch_size)):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            run.optimizer.zero_grad(set_to_none=True)
            out = run.model(x_all[idx])
            loss = run.loss_fn(out, y_all[idx])
            loss.backward()
            run.optimizer.step()
            if (b + 1) % args.every == 0:
                o = out.detach().double()
                print(f"{epoch + 1} {b + 1} {float(loss.detach()):.4f} {o.mean().item():.4f} {o.abs().max().item():g} "
                      f"{int((o.abs() == maxpos).sum())}", flush=True)
        run.scheduler.step()
        test = evaluate(run.model, run.test_set, cfg.test_batch_size, cfg.topk)
        print(f"# epoch {epoch + 1}: test top-1 {test['top1']:.2f}%, test loss {test['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
