"""One rank of the multi-process tests (tests/test_distributed.py), started with torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python tests/dist_worker.py lenet OUT DATA_DIR POLICY BATCH EPOCHS
    python tests/dist_worker.py gpt OUT POLICY STEPS

Each rank saves its own weights to OUT/rank{RANK}.pt, so a test can compare every rank
with every other and with a one-process run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from positnn import convert, distributed
from positnn.models import GPTBlock
from positnn.nn import MSELoss
from positnn.optim import SGD
from positnn.train import TrainConfig, train


def _gpt(policy: str, steps: int) -> dict[str, torch.Tensor]:
    """A tiny pre-LN GPT block through the engine (LayerNorm, attention, GELU, residuals)
    trained ``steps`` steps on fixed random data, global batch 6 split over the ranks."""
    torch.manual_seed(0)
    block = convert(GPTBlock(n_embd=16, n_head=2, dropout=0.0, bias=True), policy)
    g = torch.Generator().manual_seed(1)
    x_all, y_all = torch.randn(30, 8, 16, generator=g), torch.randn(30, 8, 16, generator=g)
    loss_fn = MSELoss(policy)
    opt = SGD(block.parameters(), lr=1 / 16, momentum=0.5)
    r = distributed.active()
    for step in range(steps):
        lo = (step * 6) % 30
        idx = torch.arange(lo, lo + 6)
        if r is not None:
            idx = idx[distributed.shard(6, r.rank, r.world)]
        opt.zero_grad(set_to_none=True)
        loss_fn(block(x_all[idx]), y_all[idx]).backward()
        opt.step()
    return block.state_dict()


def main(argv: list[str]) -> int:
    kind, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    reducer = distributed.init_from_env(60.0) if "WORLD_SIZE" in os.environ else None
    rank = 0 if reducer is None else reducer.rank
    with distributed.reducing(reducer):
        if kind == "lenet":
            data_dir, policy, batch, epochs = argv[2], argv[3], int(argv[4]), int(argv[5])
            cfg = TrainConfig(dataset="fashion-mnist", policy=policy, batch_size=batch, epochs=epochs,
                              data_dir=data_dir, threads=1, test_batch_size=16)
            holder: dict = {}
            import positnn.train as T

            original = T.build

            def keep(config):  # the Run this rank trains: its weights are this rank's own
                holder["run"] = original(config)
                return holder["run"]

            T.build = keep
            train(cfg, out / "run", progress=False, log=lambda _m: None)
            state = holder["run"].model.state_dict()
        else:
            state = _gpt(argv[2], int(argv[3]))
    torch.save({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, out / f"rank{rank}.pt")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
