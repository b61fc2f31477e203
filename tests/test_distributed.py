"""Data parallelism (positnn.distributed): the exact limb all-reduce against a Fraction
sum, the sharding, and multi-process gloo runs on localhost whose weights must equal one
process's bit for bit, on every rank; a killed rank stops the others with an error and
the run resumes on one process bit-identically."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from positnn import Posit, distributed, quire
from positnn.stage import PositStage
from positnn.train import TrainConfig, read_checkpoint, train

from posit_reference import round_exact

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
POLICY = "posit8-O16-L16q"


# -- an in-process stand-in for a process group: threads that meet at each collective ------
class _Hub:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world
        self.lock = threading.Lock()  # one thread computes at a time (numba's layers need not be re-entrant)


class _ThreadReducer(distributed.Reducer):
    """A Reducer whose collectives exchange tensors between threads: the same arithmetic
    as ``torch.distributed`` (SUM, MAX, all_gather in rank order) without processes."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__(rank, hub.world)
        self.hub = hub

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.hub.slots[self.rank] = t.clone()
        self.hub.lock.release()
        try:
            self.hub.barrier.wait()
            parts = [s.clone() for s in self.hub.slots]
            self.hub.barrier.wait()
        finally:
            self.hub.lock.acquire()
        return parts

    def all_reduce_(self, t, op=torch.distributed.ReduceOp.SUM):
        self._count(t)
        parts = self._exchange(t)
        t.copy_(sum(parts[1:], parts[0]) if op == torch.distributed.ReduceOp.SUM else torch.stack(parts).amax(0))
        return t

    def all_gather(self, t):
        self._count(t)
        return self._exchange(t)


def _on_ranks(world: int, fn) -> list:
    """fn(rank) on ``world`` threads, each inside ``reducing`` its own reducer."""
    hub = _Hub(world)
    results, errors = [None] * world, []

    def body(r: int) -> None:
        with hub.lock:
            try:
                with distributed.reducing(_ThreadReducer(hub, r)):
                    results[r] = fn(r)
            except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
                errors.append(e)
                hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _shares(k: int, world: int) -> list[slice]:
    return [distributed.shard(k, r, world) for r in range(world)]


def _exact_matmul(a: torch.Tensor, b: torch.Tensor, fmt: Posit) -> torch.Tensor:
    """The Fraction oracle: every output's exact sum of products, rounded once."""
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float64)
    for i, j in itertools.product(range(a.shape[0]), range(b.shape[1])):
        s = sum((Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(a.shape[1])), Fraction(0))
        out[i, j] = float(round_exact(s, fmt.nbits, fmt.es))
    return out


# -- sharding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(0, 3), (1, 3), (15, 2), (15, 4), (64, 3), (7, 7)])
def test_shards_tile_the_batch_in_rank_order(n, world):
    parts = _shares(n, world)
    assert list(itertools.chain.from_iterable(range(n)[p] for p in parts)) == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_shard_rejects_a_bad_rank(rank, world):
    with pytest.raises(ValueError, match="rank"):
        distributed.shard(10, rank, world)


# -- the exact reduction ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,world,seed", [(Posit(8, 2), 2, 0), (Posit(8, 2), 3, 1), (Posit(16, 1), 3, 2),
                                            (Posit(16, 2), 4, 3)])
def test_limb_all_reduce_equals_the_rounded_fraction_sum(fmt, world, seed):
    g = torch.Generator().manual_seed(seed)
    # Wide magnitudes: several slices per operand, sums that cancel, signs of every kind.
    a = fmt.round(torch.randn(3, 23, generator=g) * torch.exp2(torch.randint(-12, 12, (3, 23), generator=g).float()))
    b = fmt.round(torch.randn(23, 4, generator=g) * torch.exp2(torch.randint(-12, 12, (23, 4), generator=g).float()))
    S = PositStage(fmt, round_operands=False)
    outs = _on_ranks(world, lambda r: distributed.batch_matmul(S, a[:, _shares(23, world)[r]], b[_shares(23, world)[r]]))
    expected = _exact_matmul(a, b, fmt)
    for out in outs:
        assert torch.equal(out.double(), expected)
    # Rounding each rank's share first is a different number somewhere: what the limbs avoid.
    naive = [S.matmul(a[:, s], b[s]) for s in _shares(23, world)]
    folded = naive[0]
    for p in naive[1:]:
        folded = fmt.add(folded, p)
    assert not torch.equal(folded.double(), expected)


@pytest.mark.parametrize("int32", [True, False])
def test_limb_all_reduce_sends_only_used_columns_in_either_width(int32, monkeypatch):
    fmt = Posit(8, 2)
    if not int32:
        monkeypatch.setattr(distributed, "INT32_WORLD", 1)
    g = torch.Generator().manual_seed(5)
    a, b = fmt.round(torch.randn(6, 40, generator=g)), fmt.round(torch.randn(40, 5, generator=g))
    S = PositStage(fmt, round_operands=False)

    def rank_fn(r):
        s = _shares(40, 2)[r]
        out = distributed.batch_matmul(S, a[:, s], b[s])
        return out, distributed.active().bytes_sent

    (o0, sent), (o1, _) = _on_ranks(2, rank_fn)
    assert torch.equal(o0, quire.matmul(a, b, fmt)) and torch.equal(o0, o1)
    full_limbs = quire.Quire(fmt, (6, 5)).limbs
    assert sent < full_limbs.numel() * (4 if int32 else 8)  # fewer columns than the quire has
    assert sent > 0


def test_nar_on_one_rank_reaches_every_rank():
    fmt = Posit(8, 2)
    a, b = fmt.round(torch.randn(2, 6)), fmt.round(torch.randn(6, 3))
    a[1, 4] = float("nan")  # in rank 1's share of K
    S = PositStage(fmt, round_operands=False)
    outs = _on_ranks(2, lambda r: distributed.batch_matmul(S, a[:, _shares(6, 2)[r]], b[_shares(6, 2)[r]]))
    for out in outs:
        assert out[1].isnan().all() and not out[0].isnan().any()
        assert torch.equal(out[0], quire.matmul(a[:1], b, fmt)[0])


def test_batch_sum_and_conv_weight_gradient_equal_one_process():
    fmt = Posit(8, 2)
    S = PositStage(fmt, round_operands=False)
    g = torch.Generator().manual_seed(3)
    x, d = fmt.round(torch.randn(7, 3, 9, 9, generator=g)), fmt.round(torch.randn(7, 4, 7, 7, generator=g))
    geo = ((1, 1), (0, 0), (1, 1), 1)
    v = fmt.round(torch.randn(5, 7, generator=g))

    def rank_fn(r):
        s = _shares(7, 3)[r]
        return (distributed.batch_conv2d_weight_grad(S, x[s], d[s], (4, 3, 3, 3), *geo),
                distributed.batch_sum(S, v[:, s], 1))

    for w, total in _on_ranks(3, rank_fn):
        assert torch.equal(w, S.conv2d_weight_grad(x, d, (4, 3, 3, 3), *geo))
        assert torch.equal(total, S.sum(v, 1))


def test_conv_weight_and_bias_gradients_share_one_limb_all_reduce():
    fmt = Posit(8, 2)
    S = PositStage(fmt, round_operands=False)
    g = torch.Generator().manual_seed(4)
    x, d = fmt.round(torch.randn(7, 3, 9, 9, generator=g)), fmt.round(torch.randn(7, 4, 7, 7, generator=g))
    d[2, 1, 3, 3] = float("nan")  # a NaR reaches one weight row and one bias
    geo = ((1, 1), (0, 0), (1, 1), 1)

    def rank_fn(r):
        s = _shares(7, 3)[r]
        red = distributed.active()
        before = red.calls
        gw, gb = distributed.batch_conv2d_grads(S, x[s], d[s], (4, 3, 3, 3), *geo)
        return gw, gb, red.calls - before

    for gw, gb, calls in _on_ranks(3, rank_fn):
        assert torch.equal(gw.nan_to_num(7.0), S.conv2d_weight_grad(x, d, (4, 3, 3, 3), *geo).nan_to_num(7.0))
        assert torch.equal(gb.nan_to_num(7.0), S.sum(S.sum(d, (2, 3)), 0).nan_to_num(7.0))
        assert gb.isnan().sum() == 1
        assert calls == 3  # the column range, the limbs, the NaR marks: for both tensors together


def test_quire_none_adds_rounded_shares_in_rank_order():
    fmt = Posit(8, 2)
    S = PositStage(fmt, quire="none", round_operands=False)
    g = torch.Generator().manual_seed(4)
    a, b = fmt.round(torch.randn(4, 12, generator=g)), fmt.round(torch.randn(12, 3, generator=g))
    outs = _on_ranks(3, lambda r: distributed.batch_matmul(S, a[:, _shares(12, 3)[r]], b[_shares(12, 3)[r]]))
    shares = [S.matmul(a[:, s], b[s]) for s in _shares(12, 3)]
    expected = fmt.add(fmt.add(shares[0], shares[1]), shares[2])
    for out in outs:
        assert torch.equal(out, expected)


def test_engine_rule_reduces_sums_shaped_like_a_parameter_only():
    fmt = Posit(8, 2)
    S = PositStage(fmt)
    x = fmt.round(torch.randn(6, 4))
    param = torch.nn.Parameter(torch.zeros(4))

    def rank_fn(r):
        st = distributed.gradient_stage(S, [param])
        s = _shares(6, 2)[r]
        return st.sum(x[s], 0), st.sum(x[s], 1)

    (bias0, rows0), (bias1, rows1) = _on_ranks(2, rank_fn)
    assert torch.equal(bias0, S.sum(x, 0)) and torch.equal(bias1, bias0)  # 4 elements: a batch reduction
    assert torch.equal(rows0, S.sum(x[:3], 1)) and torch.equal(rows1, S.sum(x[3:], 1))  # per sample: local


def test_round_quire_refuses_limbs_beyond_the_bound():
    q = quire.Quire(Posit(8, 2), (2,))
    q.limbs[0, 3] = quire.LIMB_BOUND + 1
    with pytest.raises(ValueError, match="quires were summed"):
        quire.round_quire(q)


def test_float32_baseline_refuses_to_run_distributed(tmp_path, fashion_mnist_dir):
    cfg = TrainConfig(policy="float32", epochs=1, data_dir=str(fashion_mnist_dir))
    with distributed.reducing(distributed.Reducer(0, 2)), pytest.raises(ValueError, match="DistributedDataParallel"):
        train(cfg, tmp_path / "run", progress=False, log=lambda _m: None)


def test_init_from_env_names_missing_variables(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE"):
        distributed.init_from_env()


# -- processes ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _ranks(runs: list[tuple[int, list[str]]]) -> None:
    """Start every run's ranks at once (run = (world, worker args); world 0: one process
    without any process group), wait; fails the test on a nonzero exit or after 10 minutes."""
    procs = []
    for world, args in runs:
        port = _free_port()
        for r in range(max(world, 1)):
            env = _env(r, world, port)
            if world == 0:
                env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stderr=subprocess.PIPE,
                                          text=True))
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), errs


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]
    assert not differ, f"{what}: {differ} differ"


def _check_world_invariance(tmp_path: Path, kind: str, args: list[str], worlds=(0, 1, 2, 3)) -> None:
    """The worker's weights after training on each world size (0: a plain process) equal
    the first's, on every rank."""
    for w in worlds:
        (tmp_path / f"w{w}").mkdir()
    _ranks([(w, [kind, str(tmp_path / f"w{w}"), *args]) for w in worlds])
    one = _weights(tmp_path / f"w{worlds[0]}" / "rank0.pt")
    for world in worlds[1:]:
        for r in range(world):
            _assert_same(one, _weights(tmp_path / f"w{world}" / f"rank{r}.pt"), f"world {world}, rank {r}")


@pytest.mark.slow
def test_lenet5_weights_are_bit_identical_for_1_2_3_4_processes(tmp_path, fashion_mnist_dir):
    # 64 images, global batch 15: 5 steps per epoch (shares of 8/7, 5/5/5, 4/4/4/3 and a last
    # batch of 4 as 2/1/1 and 1/1/1/1), 4 epochs = 20 steps. The reference is one plain
    # process (world 0).
    _check_world_invariance(tmp_path, "lenet", [str(fashion_mnist_dir), POLICY, "15", "4"], worlds=(0, 1, 2, 3, 4))


@pytest.mark.slow
def test_gpt_block_through_the_engine_is_bit_identical_for_1_2_3_processes(tmp_path):
    _check_world_invariance(tmp_path, "gpt", [POLICY, "20"])


@pytest.mark.slow
def test_whole_gpt_through_the_engine_is_bit_identical_for_1_2_3_processes(tmp_path):
    # the position embedding's gradient is a batch sum in a B pass (the batch-free rule)
    _check_world_invariance(tmp_path, "gptlm", [POLICY, "10"])


def _cli(args: list[str], rank: int, world: int, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "positnn", "train", *args], env=_env(rank, world, port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_rank_stops_the_other_and_the_run_resumes_on_one_process(tmp_path, fashion_mnist_dir):
    out = tmp_path / "run"
    common = ["--data-dir", str(fashion_mnist_dir), "--batch-size", "15", "--threads", "1", "--test-batch-size",
              "16", "--no-progress"]
    port = _free_port()
    procs = [_cli([*common, "--epochs", "500", "--out", str(out), "--collective-timeout", "60"], r, 2, port)
             for r in range(2)]
    deadline = time.monotonic() + 300
    epoch = 0
    while epoch < 1:  # wait for the first epoch's checkpoint, then kill rank 1 mid-run
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.05)
        if (out / "checkpoint.pt").exists():
            epoch = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    procs[1].send_signal(signal.SIGKILL)
    _, err = procs[0].communicate(timeout=300)  # a hang fails the test here
    procs[1].communicate()
    assert procs[0].returncode == 1, err
    assert "rank 0 of 2: a collective failed" in err and "--resume" in err
    # The checkpoint is whole; its weights after k epochs on 2 processes are one process's.
    saved, ckpt = read_checkpoint(out / "checkpoint.pt", resume=True)
    k = ckpt["epoch"]
    assert 1 <= k < 500
    from positnn.cli import main

    assert main(["train", *common, "--epochs", str(k), "--out", str(tmp_path / "ref_k")]) == 0
    _assert_same(torch.load(tmp_path / "ref_k" / "checkpoint.pt", weights_only=True)["model"], ckpt["model"],
                 f"2 processes after {k} epoch(s)")
    # One process continues it as an uninterrupted one-process run would have gone on.
    assert main(["train", "--out", str(out), "--resume", "--epochs", str(k + 1), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", *common, "--epochs", str(k + 1), "--out", str(ref)]) == 0
    _assert_same(torch.load(ref / "checkpoint.pt", weights_only=True)["model"],
                 torch.load(out / "checkpoint.pt", weights_only=True)["model"], "resumed run")


@pytest.mark.slow
def test_nproc_per_node_launches_torchrun_and_matches_one_process(tmp_path, fashion_mnist_dir):
    common = ["--data-dir", str(fashion_mnist_dir), "--batch-size", "15", "--threads", "1", "--epochs", "2",
              "--test-batch-size", "16", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE"):
        env.pop(k, None)
    two = subprocess.run([sys.executable, "-m", "positnn", "train", *common, "--nproc-per-node", "2", "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("training lenet5") == 1  # only rank 0 logs
    from positnn.cli import main

    assert main(["train", *common, "--out", str(tmp_path / "one")]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    _assert_same(a["model"], b["model"], "torchrun run")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


# -- whole models on thread "ranks": every .grad equals one process's ----------------------------
def _grads_on_ranks(make_model, loss_fn, x, y, world):
    torch.manual_seed(0)
    ref = make_model()
    loss_fn(ref(x), y).backward()
    expected = {n: p.grad.clone() for n, p in ref.named_parameters()}

    def rank_fn(r):
        torch.manual_seed(0)
        model = make_model()
        s = distributed.shard(len(x), r, world)
        loss = loss_fn(model(x[s]), y[s])
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.no_grad():
        ref_loss = float(loss_fn(ref(x), y))
    return expected, ref_loss, _on_ranks(world, rank_fn)


@pytest.mark.parametrize("world", [2, 3])
def test_lenet5_gradients_and_loss_on_thread_ranks_equal_one_process(world):
    from positnn import convert
    from positnn.models import lenet5
    from positnn.nn import CrossEntropyLoss

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(11, 1, 28, 28, generator=g), torch.randint(0, 10, (11,), generator=g)
    expected, ref_loss, results = _grads_on_ranks(lambda: convert(lenet5(), POLICY), CrossEntropyLoss(POLICY), x, y, world)
    for loss, grads in results:
        assert loss == ref_loss  # the loss value is the global batch's
        _assert_same(expected, grads, f"world {world}")


def test_gpt_block_gradients_on_thread_ranks_equal_one_process():
    from positnn import convert
    from positnn.models import GPTBlock
    from positnn.nn import MSELoss

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 4, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    expected, _, results = _grads_on_ranks(lambda: convert(GPTBlock(8, 2, 0.0, True), POLICY), MSELoss(POLICY), x, y, 2)
    for _, grads in results:
        _assert_same(expected, grads, "GPT block")


def _tiny_gpt():
    from positnn import convert
    from positnn.models import gpt

    return convert(gpt(11, block_size=8, n_layer=1, n_head=2, n_embd=8), POLICY)


def _lm_loss():
    from positnn.nn import CrossEntropyLoss

    ce = CrossEntropyLoss(POLICY)
    return lambda logits, y: ce(logits.flatten(0, 1), y.flatten())


def _lm_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (5, 6), generator=g), torch.randint(0, 11, (5, 6), generator=g)


@pytest.mark.parametrize("world", [2, 3])
def test_full_gpt_gradients_on_thread_ranks_equal_one_process(world):
    # wpe(arange(T)) is batch-free: its gradient is a batch sum in the B pass of tok + pos
    expected, ref_loss, results = _grads_on_ranks(_tiny_gpt, _lm_loss(), *_lm_batch(), world)
    for loss, grads in results:
        assert loss == ref_loss
        _assert_same(expected, grads, f"GPT, world {world}")


def test_full_gpt_without_the_batch_free_rule_differs_in_the_position_embedding(monkeypatch):
    # the control: B passes left per rank, the position embedding's gradient is rank-local
    monkeypatch.setattr(distributed, "splits_batch_free", lambda: False)
    expected, _, results = _grads_on_ranks(_tiny_gpt, _lm_loss(), *_lm_batch(), 2)
    for _, grads in results:
        assert [n for n in expected if not torch.equal(expected[n], grads[n])] == ["wpe.weight"]


def test_batch_free_tags_follow_parameters_and_constants_only(monkeypatch):
    from positnn import convert
    from positnn.engine.mode import is_batch_free

    monkeypatch.setattr(distributed, "splits_batch_free", lambda: True)  # as in a multi-rank run
    model, seen = _tiny_gpt(), {}
    model.wpe.register_forward_hook(lambda m, a, o: seen.update(pos=o, arange=a[0]))
    model.wte.register_forward_hook(lambda m, a, o: seen.update(tok=o))
    model(_lm_batch()[0])
    assert is_batch_free(seen["arange"]) and is_batch_free(seen["pos"])
    assert not is_batch_free(seen["tok"])
    x = torch.zeros(3)
    assert not is_batch_free(x)  # made outside the model: batch data

    class Mix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            y = self.w * 2
            tags = [is_batch_free(y), is_batch_free(y.view(3, 1))]
            y.add_(x)  # written in place with batch data: no longer batch-free
            return y, tags + [is_batch_free(y)]

    _, tags = convert(Mix(), POLICY)(torch.ones(3))
    assert tags == [True, True, False]

    class Head(torch.nn.Module):  # a positnn layer tags its output at its boundary
        def __init__(self):
            super().__init__()
            self.w, self.fc = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.w), self.fc(x)

    free, batch = convert(Head(), POLICY)(torch.ones(2, 3))
    assert is_batch_free(free) and not is_batch_free(batch)


def test_a_single_process_run_tags_nothing():
    # the tags are read only by multi-rank runs, so one process does not pay for them
    from positnn import convert

    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.w * 2 + x, self.w * 2

    outs = convert(Const(), POLICY)(torch.ones(3))
    assert not any(hasattr(t, "_positnn_batch_free") for t in outs)


def test_event_counts_over_thread_ranks_are_one_process_counts():
    # inputs of 1e7 saturate F (per-rank shares) and the reduced G sums (replicated)
    from positnn import convert, stats
    from positnn.models import lenet5
    from positnn.nn import CrossEntropyLoss
    from positnn.optim import SGD

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(11, 1, 28, 28, generator=g) * 1e7, torch.randint(0, 10, (11,), generator=g)

    def run(s):
        torch.manual_seed(0)
        model = convert(lenet5(), POLICY)
        CrossEntropyLoss(POLICY)(model(x[s]), y[s]).backward()
        SGD(model.parameters(), lr=100.0).step()
        return stats.global_total(model), stats.total(model), stats.total(model, replicated=True)

    one, _, shared = run(slice(None))
    assert shared["saturation"] > 0 and one["saturation"] > shared["saturation"]
    results = _on_ranks(2, lambda r: run(distributed.shard(11, r, 2)))
    for merged, _, rep in results:
        assert merged == one and rep == shared  # replicated events once, per-rank ones summed
    assert sum(t["saturation"] for _, t, _ in results) == one["saturation"] + shared["saturation"]


def test_batchnorm_affine_gradients_on_thread_ranks_are_the_global_sums():
    fmt = Posit(8, 2)
    S = PositStage(fmt, round_operands=False)
    g = torch.Generator().manual_seed(6)
    a, b = fmt.round(torch.randn(4, 1, 9, generator=g)), fmt.round(torch.randn(4, 9, 1, generator=g))
    outs = _on_ranks(2, lambda r: distributed.batch_matmul(S, a[:, :, _shares(9, 2)[r]], b[:, _shares(9, 2)[r]]))
    for out in outs:  # the (C, 1, M) @ (C, M, 1) row dots of the affine gradients
        assert torch.equal(out, S.matmul(a, b))


def test_sign_magnitude_rows_hold_the_same_integers_in_fewer_columns():
    fmt = Posit(16, 1)
    g = torch.Generator().manual_seed(7)
    a, b = fmt.round(torch.randn(8, 30, generator=g)), fmt.round(torch.randn(30, 6, generator=g))
    q, _ = quire.matmul_quire(a, b, fmt)
    sm = distributed._sign_magnitude(q.limbs)

    def value(row):
        return sum(int(v) << (20 * i) for i, v in enumerate(row.tolist()))

    for r_in, r_out in zip(q.limbs, sm):
        assert value(r_in) == value(r_out)
        nz = [i for i, v in enumerate(r_out.tolist()) if v]
        assert all((v >= 0) == (value(r_in) >= 0) for v in r_out.tolist() if v)  # one sign per row
        assert not nz or value(r_in).bit_length() > 20 * nz[-1]  # no column above the magnitude
    assert (q.limbs[:, -1] < 0).any() and (q.limbs[:, -1] == 0).any()  # both signs were seen


def test_cli_refuses_bad_launch_options(capsys):
    from positnn.cli import main

    assert main(["train", "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be >= 1, got 0" in capsys.readouterr().err
    with distributed.reducing(distributed.Reducer(0, 2)):
        assert main(["train", "--model", "gpt", "--dataset", "tinyshakespeare"]) == 2
    assert "--model gpt trains distributed with --lm-loss positnn only" in capsys.readouterr().err


# -- the character GPT run (positnn.train_lm) on thread ranks and on processes -------------------
TEXT_DIR = REPO / "tests" / "fixtures" / "tinytext"
LM = dict(max_iters=3, batch_size=3, block_size=8, n_layer=1, n_head=2, n_embd=8, eval_interval=2, eval_iters=1,
          data_dir=str(TEXT_DIR), threads=1, lm_loss="positnn", grad_clip=0.05, warmup_iters=0, lr=1e-2)


def _lm_run(tmp_path: Path, name: str, world: int, monkeypatch) -> tuple[dict, list, list]:
    """train_lm on ``world`` thread ranks (0: no reducer) into tmp_path/name: rank 0's
    checkpoint, and each rank's final weights and clipping norms."""
    import positnn.train_lm as L

    models, norms = {}, {}
    build, clip = L.build_lm, L._clip_into_O
    monkeypatch.setattr(L, "build_lm", lambda c, v: models.setdefault(threading.get_ident(), build(c, v)))
    monkeypatch.setattr(L, "_clip_into_O", lambda m, x: norms.setdefault(threading.get_ident(), []).append(clip(m, x))
                        or norms[threading.get_ident()][-1])

    def rank_fn(_r):
        L.train_lm(L.LMConfig(**LM), tmp_path / name, progress=False, log=lambda _m: None)
        me = threading.get_ident()
        return models[me][0].state_dict(), [float(n) for n in norms[me]]

    results = _on_ranks(world, rank_fn) if world else [rank_fn(0)]
    return L.read_lm_checkpoint(tmp_path / name / "checkpoint.pt"), [s for s, _ in results], [n for _, n in results]


def test_gpt_run_on_two_thread_ranks_equals_one_process_with_the_global_clipping_norm(tmp_path, monkeypatch):
    one, (state1,), (norms1,) = _lm_run(tmp_path, "one", 0, monkeypatch)
    two, states, norms = _lm_run(tmp_path, "two", 2, monkeypatch)
    assert min(norms1) > LM["grad_clip"]  # clipping acted on every step
    for r in range(2):
        assert norms[r] == norms1  # the norm of the reduced gradients: the global one, on every rank
        _assert_same(state1, states[r], f"rank {r}")
    _assert_same(one["model"], two["model"], "checkpoint")
    assert [h | {"seconds": 0} for h in one["history"]] == [h | {"seconds": 0} for h in two["history"]]


def test_gpt_run_refuses_torch_loss_or_a_tiny_batch_when_distributed(tmp_path):
    from positnn.train_lm import LMConfig, train_lm

    with distributed.reducing(distributed.Reducer(0, 2)):
        with pytest.raises(ValueError, match="--lm-loss positnn only"):
            train_lm(LMConfig(**(LM | {"lm_loss": "torch"})), tmp_path / "a", progress=False)
        with pytest.raises(ValueError, match="batch_size 1 is smaller than the world size 2"):
            train_lm(LMConfig(**(LM | {"batch_size": 1})), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="lm_loss must be one of torch, positnn"):
        LMConfig(lm_loss="mean")


@pytest.mark.slow
def test_gpt_cli_on_two_processes_equals_one_and_resumes_on_one(tmp_path):
    from positnn.cli import main

    common = ["--model", "gpt", "--dataset", "tinyshakespeare", "--data-dir", str(TEXT_DIR), "--batch-size", "3",
              "--block-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--eval-interval", "2",
              "--eval-iters", "1", "--threads", "1", "--lm-loss", "positnn", "--grad-clip", "0.05", "--lr", "0.01", "--warmup-iters", "0",
              "--no-progress"]
    port = _free_port()
    procs = [_cli([*common, "--max-iters", "3", "--out", str(tmp_path / "two")], r, 2, port) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "training gpt" in outs[0][0] and "training gpt" not in outs[1][0]  # rank 0 logs
    assert main(["train", *common, "--max-iters", "3", "--out", str(tmp_path / "one3")]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one3", "two"))
    _assert_same(a["model"], b["model"], "2 processes after 3 iterations")
    _assert_same(a["optimizer"]["state"][0], b["optimizer"]["state"][0], "AdamW moments")
    # one process continues the 2-process run as an uninterrupted one-process run goes on
    assert main(["train", "--model", "gpt", "--out", str(tmp_path / "two"), "--resume", "--max-iters", "5",
                 "--no-progress"]) == 0
    assert main(["train", *common, "--max-iters", "5", "--out", str(tmp_path / "one5")]) == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one5", "two"))
    _assert_same(a["model"], b["model"], "resumed run")
