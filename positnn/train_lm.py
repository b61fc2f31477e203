"""Character-level language modelling: tiny Shakespeare, nanoGPT's schedule, posit stages.

``train_lm(config, out)`` trains the GPT of ``positnn.models`` for ``max_iters``
iterations of random ``block_size`` windows (seeded), with AdamW (weight decay on the
matrices only), linear warmup and cosine decay to ``min_lr``, and gradient clipping.
Every ``eval_interval`` iterations it estimates the train and validation loss on
``eval_iters`` fixed batches and appends a row to ``metrics.csv`` / ``metrics.jsonl``;
the checkpoint (``torch.load(..., weights_only=True)`` safe, written atomically) holds
every RNG state, so ``resume=True`` continues bit-identically. The corpus is
``positnn.data.text`` (tiny Shakespeare, split 90/10).

Inside ``positnn.distributed.reducing(reducer)`` (``torchrun ... -m positnn train --model
gpt``) every rank draws the same global batch of ``batch_size`` sequences and trains on
its contiguous share of the rows; with ``lm_loss="positnn"`` (required there) the loss is
positnn's cross entropy over the global batch, the engine reduces every gradient exactly
over the ranks, and the gradients are the one-process ones on every rank, so the clipping
norm computed from them is too. Rank 0 alone logs and writes the checkpoint and metrics,
which do not depend on the world size: a run resumes on any number of processes. With
``dropout > 0`` each rank draws its own masks, so such a run depends on the world size.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, optim
from .convert import convert
from .data.text import CharCorpus, load_text
from .models import GPT
from .policy import Policy
from .train import _atomic_save, _versions, check_field_types, write_metrics

LM_METRICS = ("iter", "lr", "train_loss", "val_loss", "seconds")
LM_CHECKPOINT = "checkpoint.pt"
LM_LOSSES = ("torch", "positnn")


@dataclass
class LMConfig:
    """One language-model run; the defaults are nanoGPT's CPU shakespeare_char recipe."""

    policy: str = "posit8-O16-L16q"
    max_iters: int = 2000
    batch_size: int = 12
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    lm_loss: str = "torch"  # "torch": F.cross_entropy in float32; "positnn": positnn's CE (any world size)
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    data_dir: str | None = None
    threads: int | None = None
    policy_spec: dict | None = None  # a policy file's content, stored by the run itself

    def __post_init__(self) -> None:
        check_field_types(self)
        for f in fields(self):
            if f.type == "float" and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
        for name in ("max_iters", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "lr_decay_iters",
                     "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0 <= self.dropout < 1 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("dropout, beta1 and beta2 must lie in [0, 1)")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_iters, weight_decay and grad_clip must be >= 0 (grad_clip 0: no clipping)")
        if self.lm_loss not in LM_LOSSES:
            raise ValueError(f"lm_loss must be one of {', '.join(LM_LOSSES)}, got {self.lm_loss!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self.resolved_policy()

    def resolved_policy(self) -> Policy:
        """The run's policy: the stored copy when there is one, else ``policy`` itself."""
        return Policy.from_dict(self.policy_spec) if self.policy_spec is not None else Policy.load(self.policy)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LMConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown LM config keys {sorted(unknown)}")
        return cls(**d)

    def lr_at(self, it: int) -> float:
        """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr."""
        if it < self.warmup_iters:
            return self.lr * (it + 1) / (self.warmup_iters + 1)
        if it > self.lr_decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / max(self.lr_decay_iters - self.warmup_iters, 1)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)


def build_lm(config: LMConfig, vocab: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The (converted) GPT and its AdamW, weight decay on parameters of 2 or more dims."""
    torch.manual_seed(config.seed)
    model: torch.nn.Module = GPT(vocab, config.block_size, config.n_layer, config.n_head, config.n_embd, config.dropout)
    model = convert(model, config.resolved_policy())
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
    return model, opt


def _batch(data: torch.Tensor, config: LMConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - config.block_size - 1, (config.batch_size,), generator=g)
    x = torch.stack([data[i:i + config.block_size] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + config.block_size] for i in ix.tolist()])
    return x, y


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, corpus: CharCorpus, config: LMConfig) -> dict[str, float]:
    """Mean cross entropy (float64, from the logits) on ``eval_iters`` fixed batches."""
    model.eval()
    out = {}
    for split, data in (("train", corpus.train), ("val", corpus.val)):
        g = torch.Generator().manual_seed(config.seed + (1 if split == "val" else 2))
        losses = [float(F.cross_entropy(model(x).double().flatten(0, 1), y.flatten()))
                  for x, y in (_batch(data, config, g) for _ in range(config.eval_iters))]
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def _clip_into_O(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clipping, then each gradient back in its O format (the optimizer's inputs);
    returns the total norm (from the already-reduced gradients: global, on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    with torch.no_grad():
        for p in model.parameters():
            lp = getattr(p, "posit_policy", None)
            if p.grad is not None and lp is not None and lp.optimizer is not None:
                p.grad.copy_(lp.optimizer.round(p.grad, underflow=lp.underflow))
    return norm


def _loss_fn(config: LMConfig):
    """The training loss of ``config.lm_loss`` on (B, T, V) logits and (B, T) targets."""
    if config.lm_loss == "torch":
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    from .nn import CrossEntropyLoss

    ce = CrossEntropyLoss(config.resolved_policy())
    return lambda logits, y: ce(logits.flatten(0, 1), y.flatten())


def train_lm(config: LMConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
             log=print, stop_after: int | None = None) -> list[dict]:
    """Train the character GPT into the run directory ``out``; returns the evaluation rows."""
    reducer = distributed.active()
    lead = reducer is None or reducer.rank == 0
    if reducer is not None and reducer.world > 1 and config.lm_loss != "positnn":
        raise ValueError("--model gpt trains distributed with --lm-loss positnn only (torch's cross entropy "
                         "averages over this rank's share of the batch)")
    if reducer is not None and config.batch_size < reducer.world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the world size {reducer.world}: "
                         f"every rank needs at least one sequence")
    if not lead:
        log, progress = (lambda _msg: None), False
    out = Path(out)
    ckpt_path = out / LM_CHECKPOINT
    if not resume and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:5])}); "
                         f"pass --resume to continue a run there, or choose another --out")
    if config.policy_spec is None and config.policy.strip().lower().endswith(".toml"):
        config = replace(config, policy_spec=config.resolved_policy().to_dict())  # the file may change
    if config.threads:
        import numba

        torch.set_num_threads(config.threads)
        numba.set_num_threads(min(config.threads, numba.config.NUMBA_NUM_THREADS))
    corpus = load_text(config.data_dir)
    model, opt = build_lm(config, len(corpus.chars))
    g = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    start = 0
    if resume:
        ckpt = read_lm_checkpoint(ckpt_path)
        saved = LMConfig.from_dict(ckpt["config"])
        free = {"max_iters": 0, "threads": None, "data_dir": None, "policy_spec": None}
        if asdict(saved) | free != asdict(config) | free:
            raise ValueError(f"cannot resume {out}: its config {asdict(saved)} differs from {asdict(config)} "
                             f"beyond max_iters, threads and data_dir")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        g.set_state(ckpt["batch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        history, start = ckpt["history"], ckpt["iter"]
        log(f"resuming {out} at iteration {start}")
    else:
        if reducer is not None:
            reducer.barrier()  # every rank has checked ``out`` before rank 0 writes into it
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps({"config": asdict(config), "versions": _versions(),
                                                         "vocab": corpus.chars}, indent=2))
    loss_fn = _loss_fn(config)
    t0, done = time.perf_counter(), 0
    bar = tqdm(range(start, config.max_iters), desc="iter", disable=not progress, dynamic_ncols=True,
               initial=start, total=config.max_iters)
    for it in bar:
        if stop_after is not None and done >= stop_after:
            break
        if it % config.eval_interval == 0 or it == config.max_iters - 1:
            losses = estimate_loss(model, corpus, config)
            history.append({"iter": it, "lr": config.lr_at(it), "train_loss": losses["train"], "val_loss": losses["val"],
                            "seconds": round(time.perf_counter() - t0, 2)})
            if lead:
                write_metrics(out, history, LM_METRICS)
            log(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        for group in opt.param_groups:
            group["lr"] = config.lr_at(it)
        x, y = _batch(corpus.train, config, g)  # the global batch, the same on every rank
        if reducer is not None:
            rows = distributed.shard(len(x), reducer.rank, reducer.world)
            x, y = x[rows], y[rows]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if config.grad_clip:
            _clip_into_O(model, config.grad_clip)
        opt.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        done += 1
        if lead and ((it + 1) % config.eval_interval == 0 or it + 1 == config.max_iters or stop_after == done):
            _atomic_save({"iter": it + 1, "config": asdict(config), "history": history, "versions": _versions(),
                          "vocab": corpus.chars, "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "batch_rng": g.get_state(), "torch_rng": torch.get_rng_state()}, ckpt_path)
    return history


def read_lm_checkpoint(path: str | os.PathLike) -> dict:
    """A language-model checkpoint, read with ``weights_only=True``; ValueError naming the
    file when it is not one."""
    try:
        ckpt = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file raises many kinds
        raise ValueError(f"{path} is not a readable positnn checkpoint ({type(e).__name__})") from e
    need = ("iter", "config", "history", "vocab", "model", "optimizer", "batch_rng", "torch_rng")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise ValueError(f"{path} is not a positnn language-model checkpoint (it needs {', '.join(need)})")
    return ckpt


def sample(run_dir: str | os.PathLike, max_new_tokens: int = 500, *, prompt: str = "\n", temperature: float = 1.0,
           seed: int = 0) -> str:
    """Text generated by a run's checkpointed model after ``prompt``, in the run's posits."""
    if max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"need max_new_tokens >= 1 and temperature > 0, got {max_new_tokens} and {temperature}")
    ckpt = read_lm_checkpoint(Path(run_dir) / LM_CHECKPOINT)
    config = LMConfig.from_dict(ckpt["config"])
    corpus_chars = ckpt["vocab"]
    model, _ = build_lm(config, len(corpus_chars))
    model.load_state_dict(ckpt["model"])
    model.eval()
    lookup = {c: i for i, c in enumerate(corpus_chars)}
    unknown = sorted(set(prompt) - set(lookup))
    if unknown:
        raise ValueError(f"prompt characters {unknown} are not in the model's vocabulary")
    idx = torch.tensor([[lookup[c] for c in prompt]], dtype=torch.int64)
    ids = model.generate(idx, max_new_tokens, temperature, generator=torch.Generator().manual_seed(seed))
    return "".join(corpus_chars[i] for i in ids[0].tolist())
