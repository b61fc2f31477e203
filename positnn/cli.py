"""The ``positnn`` command: train, eval, quantize-eval, formats, plot, reproduce, data fetch."""

from __future__ import annotations

import argparse
import copy
import re
import sys
from dataclasses import fields
from pathlib import Path

from .format import Posit
from .train import CHECKPOINT, TrainConfig

# TrainConfig fields that are command-line options (policy_spec is filled in by a run itself).
_OPTIONS = [f for f in fields(TrainConfig) if f.name != "policy_spec"]


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (defaults: the paper's LeNet-5 / Fashion-MNIST / posit8-O16-L16q)")
    defaults = TrainConfig.__dataclass_fields__
    helps = {
        "model": "lenet5, cifarnet, mlp, resnet20, or gpt (character LM)",
        "dataset": "mnist, fashion-mnist, cifar10, cifar100, or tinyshakespeare (with --model gpt)",
        "policy": "a recipe (posit8-O16-L16q, posit(16,1), float32, ...), or a .toml policy file",
        "subset": "train and test on the first N images only (quick looks)",
        "lr_step": "halve (x lr-gamma) the learning rate every this many epochs",
        "data_dir": "directory holding the data set files (searched first)",
        "threads": "torch threads", "topk": "k of the top-k accuracy",
    }
    for f in _OPTIONS:
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        # SUPPRESS: an option left out is absent from args, so --resume can tell "not given"
        # from "given with the default value".
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=argparse.SUPPRESS,
                       help=f"{helps.get(f.name, '')} (default: {defaults[f.name].default})")
    from .train_lm import LMConfig

    for f in fields(LMConfig):
        if f.name in defaults:
            continue
        kind = {"int": int, "float": float}[str(f.type).split(" ")[0]]
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=argparse.SUPPRESS,
                       help=f"(--model gpt) default: {LMConfig.__dataclass_fields__[f.name].default}")
    p.add_argument("--out", help="run directory (default: runs/DATASET-MODEL-POLICY)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="train data-parallel in N processes on this machine (runs torchrun --standalone)")
    p.add_argument("--collective-timeout", type=float, default=None,
                   help="distributed runs: seconds before a collective with a dead rank fails (default: 300)")


def _cmd_train_lm(args) -> int:
    from .train_lm import LMConfig, read_lm_checkpoint, train_lm

    names = {f.name for f in fields(LMConfig)}
    given = {k: v for k, v in vars(args).items() if k in names | {f.name for f in _OPTIONS}}
    given.pop("model", None)
    if given.pop("dataset", "tinyshakespeare") != "tinyshakespeare":
        raise ValueError("--model gpt trains on --dataset tinyshakespeare only")
    wrong = sorted(set(given) - names)
    if wrong:
        raise ValueError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to --model gpt "
                         f"(an iteration-based run: see --max-iters, --eval-interval)")
    out = Path(args.out or f"runs/tinyshakespeare-gpt-{re.sub(r'[^A-Za-z0-9.-]+', '_', given.get('policy', LMConfig.policy))}")
    if args.resume and (out / "checkpoint.pt").exists():
        saved = read_lm_checkpoint(out / "checkpoint.pt")["config"]
        cfg = LMConfig.from_dict({**saved, **given})
    else:
        cfg = LMConfig(**given)
    print(f"training gpt on tinyshakespeare with {cfg.policy} into {out}")
    try:
        history = train_lm(cfg, out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    if history:
        print(f"final validation loss {history[-1]['val_loss']:.4f}; metrics in {out}/metrics.csv")
    return 0


_LAUNCH = {"nproc_per_node", "collective_timeout", "argv"}


def _cmd_train(args) -> int:
    import os

    if args.nproc_per_node is not None and "RANK" not in os.environ:
        return _launch(args)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return _train_distributed(args)
    return _train_here(args)


def _launch(args) -> int:
    """``positnn train --nproc-per-node N ...`` as ``torchrun --standalone --nproc-per-node
    N -m positnn train ...`` (the same arguments, less the launch option)."""
    import subprocess

    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    rest, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           "-m", "positnn", *rest]
    return subprocess.call(cmd)


def _train_distributed(args) -> int:
    """One rank of a torchrun launch: join the group, train on this rank's shares. A rank
    whose peer died stops with an error naming itself (the collective timeout bounds the
    wait) instead of hanging; the last checkpoint, written whole by rank 0, stays."""
    from . import distributed

    timeout = distributed.DEFAULT_TIMEOUT_S if args.collective_timeout is None else args.collective_timeout
    reducer = distributed.init_from_env(timeout)
    try:
        with distributed.reducing(reducer):
            return _train_here(args)
    except RuntimeError as e:  # torch.distributed's errors: a peer closed the connection, a timeout
        print(f"error: rank {reducer.rank} of {reducer.world}: a collective failed, so the run stops "
              f"(another rank died or timed out; resume with --resume): {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        distributed.shutdown()


def _train_here(args) -> int:
    from . import distributed
    from .train import read_checkpoint, resume_config, train

    if getattr(args, "model", None) == "gpt" or getattr(args, "dataset", None) == "tinyshakespeare":
        if distributed.active() is not None:
            raise ValueError("--model gpt does not train distributed yet (image models only)")
        return _cmd_train_lm(args)
    lm_only = sorted(k for k in vars(args) if k not in {f.name for f in _OPTIONS} | {"out", "resume", "no_progress",
                                                                                     "command"} | _LAUNCH)
    if lm_only:
        raise ValueError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in lm_only)} apply to --model gpt only")
    given = {f.name: getattr(args, f.name) for f in _OPTIONS if hasattr(args, f.name)}
    if args.out:
        out = Path(args.out)
    else:
        named = TrainConfig(**given)
        out = Path(f"runs/{named.dataset}-{named.model}-{re.sub(r'[^A-Za-z0-9.-]+', '_', named.policy)}")
    if args.resume and (out / CHECKPOINT).exists():
        # A resumed run keeps its own config (its policy file may be gone by now); only the
        # options given explicitly count as changes, and only epochs, threads and data-dir may.
        saved, _ = read_checkpoint(out / CHECKPOINT, resume=True)
        cfg = resume_config(saved, given, out)
    else:
        cfg = TrainConfig(**given)
    lead = distributed.rank() == 0
    if lead:
        print(f"training {cfg.model} on {cfg.dataset} with {cfg.policy} into {out}", flush=True)
    try:
        history = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    if history and lead:
        print(f"final test top-1 {history[-1]['top1']:.2f}%; metrics in {out}/metrics.csv")
    return 0


def _cmd_eval(args) -> int:
    from .data import load_dataset
    from .train import evaluate, load_model

    model, cfg = load_model(args.checkpoint)
    test = load_dataset(args.dataset or cfg.dataset, "test", args.data_dir or cfg.data_dir)
    r = evaluate(model, test, cfg.test_batch_size, cfg.topk)
    print(f"{args.checkpoint}: {cfg.policy} on {test.name}: loss {r['loss']:.4f}  top-1 {r['top1']:.2f}%  "
          f"top-{r['k']} {r['topk']:.2f}%")
    return 0


def _cmd_quantize_eval(args) -> int:
    from .convert import convert
    from .data import load_dataset
    from .policy import Policy
    from .report import markdown_table
    from .train import evaluate, is_float, load_model

    model, cfg = load_model(args.checkpoint)
    if not is_float(cfg.resolved_policy()):
        print(f"error: quantize-eval takes a float32 checkpoint; {args.checkpoint} was trained with {cfg.policy}",
              file=sys.stderr)
        return 2
    test = load_dataset(cfg.dataset, "test", args.data_dir or cfg.data_dir)
    if args.subset:
        import torch

        test = torch.utils.data.TensorDataset(*(t[:args.subset] for t in test.tensors))
    base = evaluate(model, test, cfg.test_batch_size, cfg.topk)["top1"]
    rows = []
    for nbits in args.nbits:
        for es in args.es:
            cells = []
            for underflow in (False, True):
                fmt = Posit(nbits, es)
                pm = convert(copy.deepcopy(model), Policy(forward=fmt, backward=fmt, gradient=fmt, optimizer=fmt, loss=fmt,
                                                        quire="exact", underflow=underflow))
                cells.append(f"{evaluate(pm, test, cfg.test_batch_size, cfg.topk)['top1']:.2f}%")
            rows.append([str(fmt), *cells])
            print(f"{str(fmt):12} {cells[0]:>8} {cells[1]:>8}", flush=True)
    text = f"float32: {base:.2f}%\n\n" + markdown_table(["format", "top-1", "top-1 with underflow"], rows)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


def _cmd_formats(args) -> int:
    from .report import markdown_table

    rows = []
    for n in args.nbits:
        for es in args.es:
            f = Posit(n, es)
            rows.append([str(f), f"2^-{f.max_exponent}", f"2^{f.max_exponent}", str(f.max_significand_bits),
                         str(f.dtype).replace("torch.", ""), str(f.storage_dtype).replace("torch.", ""), str(f.quire_bits)])
    print(markdown_table(["format", "minpos", "maxpos", "significand bits", "carrier", "storage", "quire bits"], rows))
    return 0


def _cmd_plot(args) -> int:
    from .report import plot_runs

    print(plot_runs(args.runs, args.output))
    return 0


def _cmd_reproduce(args) -> int:
    from .reproduce import reproduce

    overrides = {k: v for k, v in (("epochs", args.epochs), ("subset", args.subset), ("data_dir", args.data_dir)) if v is not None}
    if args.datasets and args.table == "table7":
        overrides["datasets"] = args.datasets
    print(reproduce(args.table, args.out, jobs=args.jobs, **overrides))
    return 0


def _cmd_sample(args) -> int:
    from .train_lm import sample

    print(sample(args.run, args.max_new_tokens, prompt=args.prompt, temperature=args.temperature, seed=args.seed))
    return 0


def _cmd_fetch(args) -> int:
    from .data import fetch

    print(fetch(args.name, args.dest))
    return 0


def _ints(text: str) -> list[int]:
    """"3..8" or "3,5,8" -> a list of ints."""
    if ".." in text:
        lo, hi = text.split("..")
        return list(range(int(lo), int(hi) + 1))
    return [int(t) for t in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="positnn", description="Deep learning in simulated posit arithmetic.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its test set")
    p.add_argument("checkpoint")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")

    p = sub.add_parser("quantize-eval", help="post-training posit inference of a float32 checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--nbits", type=_ints, default=list(range(3, 9)), help="e.g. 3..8 (default) or 5,8")
    p.add_argument("--es", type=_ints, default=[0, 1, 2], help="e.g. 0..2 (default)")
    p.add_argument("--subset", type=int, help="first N test images only")
    p.add_argument("--data-dir")
    p.add_argument("--output", help="also write the Markdown table here")

    p = sub.add_parser("formats", help="a table of posit format properties")
    p.add_argument("--nbits", type=_ints, default=[8, 16, 32])
    p.add_argument("--es", type=_ints, default=[0, 1, 2])

    p = sub.add_parser("plot", help="accuracy and loss curves of runs on one PNG")
    p.add_argument("runs", nargs="+")
    p.add_argument("-o", "--output", default="curves.png")

    p = sub.add_parser("reproduce", help="run the paper's Table 4 or Table 7 (or a TOML list) and compare")
    p.add_argument("table", help="table4, table7, or a .toml file of [runs.NAME] configs")
    p.add_argument("--out", default="results")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--epochs", type=int)
    p.add_argument("--subset", type=int)
    p.add_argument("--datasets", nargs="+", help="table7 only (default: mnist fashion-mnist)")
    p.add_argument("--data-dir")

    p = sub.add_parser("sample", help="generate text from a language-model run's checkpoint")
    p.add_argument("run", help="the run directory of a `positnn train --model gpt` run")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("data", help="data set commands")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download a data set from its canonical source (needs network)")
    f.add_argument("name")
    f.add_argument("--dest", default=str(Path.home() / ".cache" / "positnn"))
    return parser


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "quantize-eval": _cmd_quantize_eval, "formats": _cmd_formats,
            "plot": _cmd_plot, "reproduce": _cmd_reproduce, "sample": _cmd_sample, "data": _cmd_fetch}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``positnn`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
