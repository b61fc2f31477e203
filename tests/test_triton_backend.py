"""The Triton backend, bit for bit against the numba backend and against the oracles.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors
(``TRITON_INTERPRET=1``, set here before any positnn Triton kernel is imported, and
``POSITNN_BACKEND=triton``); with CUDA they run compiled, on CUDA tensors. Devices are
parametrized as in mptorch (``available_devices``). Sizes are small: the interpreter
executes every kernel operation as a numpy call over a block.

Checked: exhaustive rounding (nearest, stochastic with the same uniforms), encode and
decode of small formats; every operand pair of posit(8,2) for add, sub, mul and div, every
operand of sqrt, random triples for fma; random 16- and 32-bit samples; the softposit and
Fraction-reference oracle checks of ``test_format_softposit`` and ``test_quire_softposit``
rerun through the Triton kernels; the exact quire (matmul with sliced operands and a bias,
conv2d and its gradients, NaR) against the numba path; stats counters without a sync.
"""

import os

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before positnn's Triton kernels are imported

import contextlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from fractions import Fraction  # noqa: E402

import pytest  # noqa: E402

import positnn  # noqa: E402
import test_format_softposit as tfs  # noqa: E402
import test_quire_softposit as tqs  # noqa: E402
from positnn import Posit, backends, quire  # noqa: E402
from positnn.stats import LayerStats  # noqa: E402
from posit_reference import round_pattern  # noqa: E402

# The interpreter computes in numpy, which warns where IEEE arithmetic overflows to inf or
# makes a NaN (the kernels handle both, as the compiled ones do silently).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
# mptorch's available_devices, for the Triton kernels: triton.jit builds them in one mode
# per process, compiled for CUDA where there is a GPU, else for the interpreter on the CPU.
available_devices = ["cuda"] if HAS_CUDA else ["cpu"]
DEVICE = available_devices[0]
SMALL = [Posit(8, 0), Posit(8, 1), Posit(8, 2), Posit(6, 1), Posit(5, 3)]


@contextlib.contextmanager
def on_triton(device: str):
    """Run the Triton kernels for ``device``: forced (interpreter) on the CPU, by the
    device's own registration on CUDA. The numba backend runs outside the block."""
    old = os.environ.get("POSITNN_BACKEND")
    if device == "cpu":
        os.environ["POSITNN_BACKEND"] = "triton"
    try:
        assert positnn.backend(device) == "triton"
        yield
    finally:
        if old is None:
            os.environ.pop("POSITNN_BACKEND", None)
        else:
            os.environ["POSITNN_BACKEND"] = old


@contextlib.contextmanager
def on_device_inputs(module, name: str, device: str):
    """Make ``module.name`` (a tensor factory of an oracle suite) build its tensors on
    ``device``, so that the suite's positnn calls run there."""
    orig = getattr(module, name)
    setattr(module, name, lambda *a, **kw: orig(*a, **kw).to(device))
    try:
        yield
    finally:
        setattr(module, name, orig)


class _QuireOn:
    """``positnn.quire`` with the operands of ``matmul`` moved to a device."""

    def __init__(self, device: str):
        self.device = device

    def matmul(self, a, b, fmt, **kw):
        return quire.matmul(a.to(self.device), b.to(self.device), fmt, **kw)

    def __getattr__(self, name):
        return getattr(quire, name)


@contextlib.contextmanager
def on_device_quire(device: str):
    orig = tqs.quire
    tqs.quire = _QuireOn(device)
    try:
        yield
    finally:
        tqs.quire = orig


def bits(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns of a float tensor (on the CPU): -0 and 0 differ, NaN equals
    NaN. Integer tensors are compared as they are."""
    t = t.detach().cpu()
    if not t.dtype.is_floating_point:
        return t
    t = torch.where(torch.isnan(t), torch.full_like(t, math.nan), t)
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    g, w = bits(got), bits(want)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: {got.cpu().reshape(-1)[0]}"


def probes(fmt: Posit) -> torch.Tensor:
    """Every value of fmt, every midpoint between neighbours (arithmetic and geometric),
    their float64 neighbours, values beyond maxpos and minpos, and the specials."""
    v = fmt.values().double()
    v = v[torch.isfinite(v)].sort().values
    mids = torch.cat([(v[1:] + v[:-1]) / 2, torch.sign(v[1:]) * torch.sqrt((v[1:] * v[:-1]).abs())])
    base = torch.cat([v, mids, v * 1.5, v / 3, torch.tensor([fmt.maxpos * 4, fmt.minpos / 4, fmt.minpos / 2**(2**fmt.es)])])
    base = torch.cat([base, -base])
    near = torch.cat([torch.nextafter(base, torch.tensor(math.inf)), torch.nextafter(base, torch.tensor(-math.inf))])
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e300])
    return torch.cat([base, near, specials])


def test_backend_is_registered_for_cuda_and_forced_by_name(monkeypatch):
    assert "triton" in backends.available()
    assert positnn.backend("cuda") == "triton"
    monkeypatch.setenv("POSITNN_BACKEND", "triton")
    assert positnn.backend() == "triton" and positnn.backend("cpu") == "triton"


def test_unimportable_backend_falls_back_for_its_device_and_fails_when_forced(monkeypatch):
    monkeypatch.setattr(backends, "_backends", {**backends._backends, "triton": "positnn.backends.no_such_module"})
    monkeypatch.setattr(backends, "_unimportable", set())
    with pytest.warns(UserWarning, match="falling back to 'numba'"):
        assert backends.backend_for("cuda").NAME == "numba"
    monkeypatch.setenv("POSITNN_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"cannot be imported.*positnn\[gpu\]"):
        positnn.backend()


def test_cpu_tensors_outside_the_interpreter_are_refused():
    """Without TRITON_INTERPRET at import, a forced Triton backend refuses CPU tensors
    with what to do (a fresh process: this one imported the kernels interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(POSITNN_BACKEND="triton", PYTHONPATH=os.pathsep.join(sys.path))
    code = "import torch; from positnn import Posit; Posit(8, 2).round(torch.ones(2))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TRITON_INTERPRET=1" in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------ rounding, encode, decode


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", SMALL, ids=str)
def test_round_nearest_exhaustive(fmt, device):
    x = probes(fmt)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        for underflow in (False, True):
            want = fmt.round(xd, underflow=underflow)
            with on_triton(device):
                got = fmt.round(xd.to(device), underflow=underflow)
            assert got.device.type == device
            assert_same(got, want, f"{fmt} round {dtype} underflow={underflow}")
    # and the exact reference on the float64 probes
    finite = x[torch.isfinite(x)]
    with on_triton(device):
        pats = fmt.encode(fmt.round(finite.to(device))).long().cpu() & ((1 << fmt.nbits) - 1)
    ref = [round_pattern(Fraction(float(v)), fmt.nbits, fmt.es) for v in finite]
    assert pats.tolist() == ref


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", [Posit(8, 2), Posit(6, 1), Posit(16, 1), Posit(32, 2)], ids=str)
def test_round_stochastic_same_uniforms(fmt, device):
    x = probes(fmt) if fmt.nbits <= 8 else torch.randn(4096, dtype=torch.float64) * 2.0 ** torch.randint(-30, 30, (4096,))
    rand = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    numba_be, triton_be = backends.get("numba"), backends.get("triton")
    for underflow in (False, True):
        want = numba_be.round_stochastic(x, rand, fmt, underflow)
        got = triton_be.round_stochastic(x.to(device), rand.to(device), fmt, underflow)
        assert_same(got, want, f"{fmt} stochastic underflow={underflow}")
    # through the public API with a generator on the tensor's device
    g1, g2 = torch.Generator(device).manual_seed(5), torch.Generator("cpu").manual_seed(5)
    with on_triton(device):
        got = fmt.round(x.to(device), "stochastic", generator=g1)
    if device == "cpu":
        assert_same(got, fmt.round(x, "stochastic", generator=g2), f"{fmt} stochastic via Posit.round")
    lo, hi = fmt.round(x).double(), got.double().cpu()
    assert bool(((hi == lo) | torch.isnan(lo) | (fmt.round(hi) == hi)).all())


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", SMALL + [Posit(10, 1)], ids=str)
def test_decode_encode_exhaustive(fmt, device):
    pats = torch.arange(1 << fmt.nbits, dtype=torch.int64)
    want = fmt.decode(pats)
    for dt in (torch.int64, torch.int32, torch.int16, fmt.storage_dtype):
        with on_triton(device):
            got = fmt.decode(pats.to(dt).to(device))
        assert_same(got, want, f"{fmt} decode from {dt}")
    with on_triton(device):
        enc = fmt.encode(want.to(device))
    assert torch.equal(enc.cpu(), fmt.encode(want))
    assert torch.equal(enc.cpu().long() & ((1 << fmt.nbits) - 1), pats)
    x = probes(fmt)
    with on_triton(device), pytest.raises(ValueError, match=r"element\(s\) are not"):
        fmt.encode(x.to(device))
    numba_out, numba_bad = backends.get("numba").encode(x, fmt)
    triton_out, triton_bad = backends.get("triton").encode(x.to(device), fmt)
    assert triton_bad == numba_bad > 0 and torch.equal(triton_out.cpu(), numba_out)


# ---------------------------------------------------------------------------- arithmetic


def _arith_equal(fmt: Posit, device: str, op: str, *args: torch.Tensor) -> None:
    want = getattr(fmt, op)(*args)
    with on_triton(device):
        got = getattr(fmt, op)(*(a.to(device) for a in args))
    assert got.device.type == device
    assert_same(got, want, f"{fmt} {op}")


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", [Posit(8, 2), Posit(8, 0)], ids=str)
def test_all_pairs_posit8(fmt, device):
    v = fmt.values()
    a, b = (t.reshape(-1) for t in torch.meshgrid(v, v, indexing="ij"))
    for op in ("add", "sub", "mul", "div"):
        _arith_equal(fmt, device, op, a, b)
    _arith_equal(fmt, device, "sqrt", v)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (3, 30000), generator=g)
    _arith_equal(fmt, device, "fma", v[idx[0]], v[idx[1]], v[idx[2]])


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", [Posit(16, 1), Posit(16, 2), Posit(32, 2), Posit(32, 5), Posit(29, 3)], ids=str)
def test_random_samples_wide_formats(fmt, device):
    g = torch.Generator().manual_seed(fmt.nbits * 8 + fmt.es)
    n = 20000
    pats = [torch.randint(-(1 << (fmt.nbits - 1)), 1 << (fmt.nbits - 1), (n,), generator=g) for _ in range(3)]
    a, b, c = (fmt.decode(p) for p in pats)
    for op in ("add", "sub", "mul", "div"):
        _arith_equal(fmt, device, op, a, b)
    _arith_equal(fmt, device, "sqrt", a)
    _arith_equal(fmt, device, "fma", a, b, c)
    # near-cancelling fma: a*b + c with c = -round(a*b) (the error-free transformations)
    _arith_equal(fmt, device, "fma", a, b, -fmt.mul(a, b))
    _arith_equal(fmt, device, "add", a, -a + a * 2.0**-40)


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt", [Posit(32, 5), Posit(24, 5), Posit(16, 4), Posit(8, 5), Posit(32, 2)], ids=str)
def test_extremes_every_triple(fmt, device):
    """Products and quotients beyond float64's range (clamped, then saturated) and every
    special, all triples: random samples almost never reach these."""
    e = [fmt.maxpos, fmt.minpos, fmt.maxpos / 2**(2**fmt.es), fmt.minpos * 2**(2**fmt.es), 1.0, 0.0, math.inf, math.nan]
    v = fmt.round(torch.tensor(e + [-x for x in e], dtype=torch.float64))
    a, b, c = (t.reshape(-1) for t in torch.meshgrid(v, v, v, indexing="ij"))
    for op in ("add", "sub", "mul", "div"):
        _arith_equal(fmt, device, op, a, b)
    _arith_equal(fmt, device, "sqrt", a)
    _arith_equal(fmt, device, "fma", a, b, c)
    _arith_equal(fmt, device, "fma", a, b, -fmt.mul(a, b))


@pytest.mark.parametrize("device", available_devices)
def test_scalars_and_broadcasting(device):
    fmt = Posit(16, 1)
    x = fmt.round(torch.randn(5, 1) * 3)
    y = fmt.round(torch.randn(1, 4))
    _arith_equal(fmt, device, "add", x, y)
    want = fmt.mul(x, 0.3)
    with on_triton(device):
        got = fmt.mul(x.to(device), 0.3)
    assert_same(got, want, "mul by a Python scalar")


@pytest.mark.parametrize("op", tfs.OPS)
@pytest.mark.parametrize("kind,n", [("posit8", 8), ("posit16", 16), ("posit32", 32), ("posit_2", 12)], ids=str)
def test_softposit_and_reference_oracles_through_triton(kind, n, op):
    """``test_format_softposit``'s checks (softposit, and the exact reference where they
    disagree), with every positnn op running in the Triton kernels."""
    with on_triton(DEVICE), on_device_inputs(tfs, "f64", DEVICE):
        tfs.check_op(tfs.SoftPosit(kind, n), op, 300, seed=n * 10 + tfs.OPS.index(op))
        if op == "add":
            tfs.check_round(tfs.SoftPosit(kind, n), 500, seed=n)


# ------------------------------------------------------------------------------ the quire


def wide(fmt: Posit, shape, spread: int, g: torch.Generator) -> torch.Tensor:
    """Posits with exponents over +-spread binades (wide row spans: sliced GEMMs)."""
    e = torch.randint(-spread, spread + 1, shape, generator=g).double()
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0**e
    x = torch.where(torch.rand(shape, generator=g) < 0.1, 0.0, x)
    return fmt.round(x)


def _quire_equal(device: str, fn, *args, **kw) -> torch.Tensor:
    want = fn(*args, **kw)
    with on_triton(device):
        got = fn(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args),
                 **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert got.device.type == device
    assert_same(got, want, getattr(fn, "__name__", "quire op"))
    return got


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt,spread", [(Posit(8, 2), 4), (Posit(8, 2), 20), (Posit(16, 1), 12), (Posit(16, 2), 40),
                                        (Posit(32, 2), 20)], ids=str)
def test_quire_matmul_matches_numba(fmt, spread, device):
    g = torch.Generator().manual_seed(spread)
    a, b = wide(fmt, (2, 7, 33), spread, g), wide(fmt, (33, 5), spread, g)
    bias = wide(fmt, (5,), spread, g)
    _quire_equal(device, quire.matmul, a, b, fmt)
    _quire_equal(device, quire.matmul, a, b, fmt, bias=bias)
    _quire_equal(device, quire.matmul, a, b, fmt, bias=bias, underflow=True)
    _quire_equal(device, quire.matmul, a[0, 0], b, fmt)  # 1-D operand
    _quire_equal(device, quire.sum, a, 1, fmt)
    a2 = a.clone()
    a2[0, 1, 3] = math.nan  # NaR makes its row NaR
    out = _quire_equal(device, quire.matmul, a2, b, fmt, bias=bias)
    assert bool(out[0, 1].isnan().all()) and not bool(out[0, 0].isnan().any())


def test_quire_sliced_paths_are_exercised():
    """The wide cases above do reach the slicing and the limb recombination."""
    fmt, g = Posit(16, 2), torch.Generator().manual_seed(40)
    a, b = wide(fmt, (1, 7, 33), 40, g), wide(fmt, (33, 5), 40, g)
    calls = []
    tb = backends.get("triton")
    with on_triton(DEVICE):
        orig = tb.round_terms
        try:
            tb.round_terms = lambda *args, **kw: calls.append(args[1:3]) or orig(*args, **kw)
            quire.matmul(a.to(DEVICE), b.to(DEVICE), fmt)
        finally:
            tb.round_terms = orig
    assert calls and calls[0][0] * calls[0][1] > 1


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("fmt,spread", [(Posit(8, 2), 3), (Posit(16, 1), 10), (Posit(16, 2), 30)], ids=str)
def test_quire_conv2d_and_grads_match_numba(fmt, spread, device):
    g = torch.Generator().manual_seed(spread + 1)
    x, w, bias = wide(fmt, (2, 3, 7, 7), spread, g), wide(fmt, (4, 3, 3, 3), spread, g), wide(fmt, (4,), spread, g)
    y = _quire_equal(device, quire.conv2d, x, w, bias, fmt, 1, 1)
    _quire_equal(device, quire.conv2d, x, w, None, fmt, 2, 0)
    grad = fmt.round(torch.randn(y.shape, generator=g))
    _quire_equal(device, quire.conv2d_input_grad, grad, w, x.shape, fmt, 1, 1)
    _quire_equal(device, quire.conv2d_weight_grad, x, grad, w.shape, fmt, 1, 1)


@pytest.mark.parametrize("name,n,es,kmax", [tqs.ORACLES[0], tqs.ORACLES[1], tqs.ORACLES[2], tqs.ORACLES[6]],
                         ids=lambda o: str(o))
def test_softposit_quire_oracle_through_triton(name, n, es, kmax):
    """``test_quire_softposit``'s dot products (random, cancelling, at midpoints) against
    SoftPosit's quires and the exact reference, through the Triton quire."""
    with on_triton(DEVICE), on_device_quire(DEVICE):
        tqs.run_sample(name, n, es, min(kmax, 64), 8, seed=len(name) * 7 + n)


# ------------------------------------------------------------------------------- counters


@pytest.mark.parametrize("device", available_devices)
@pytest.mark.parametrize("deferred", [False, True])
def test_stats_counters_accumulate_on_the_device(device, deferred, monkeypatch):
    """Deferred (every non-CPU device; forced here on the CPU too), recording reads
    nothing back: the counts are synchronised only when read, and equal the eager ones."""
    from positnn import stats

    if deferred:
        monkeypatch.setattr(stats, "_on_host", lambda t: False)
    fmt = Posit(8, 2)
    s = LayerStats()
    t = torch.tensor([1.0, math.nan, fmt.maxpos, -fmt.maxpos, 0.5], device=device)

    def no_sync(*args, **kw):
        raise AssertionError("a host synchronisation while recording")

    with monkeypatch.context() as m:
        if deferred or device != "cpu":
            for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
                m.setattr(torch.Tensor, name, no_sync)
        s.record("forward", t, fmt)
        s.record("forward", t[:2], fmt)
        s.record("backward", torch.ones(3, device=device), fmt)
        s.add("loss", "nar", 2)
    assert s.as_dict() == {"forward": {"nar": 2, "saturation": 2}, "loss": {"nar": 2, "saturation": 0}}
    s.record("forward", t, fmt)
    assert s.counts["forward"] == {"nar": 3, "saturation": 4}
    s.reset()
    assert s.as_dict() == {}


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("device", available_devices)
def test_lenet_training_steps_match_numba(device):
    """Two posit8-O16-L16q LeNet-5 steps (quire convolutions and GEMMs, loss, SGD with
    momentum) through the Triton backend give the numba backend's weights bit for bit."""
    import positnn.nn as pnn
    from positnn import optim
    from positnn.convert import convert
    from positnn.models import lenet5

    torch.manual_seed(0)
    base = lenet5()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)

    def train(dev: str) -> dict:
        model = convert(base, "posit8-O16-L16q").to(dev)
        loss_fn, opt = pnn.CrossEntropyLoss("posit8-O16-L16q"), optim.SGD(model.parameters(), lr=1 / 16, momentum=0.5)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}

    want = train("cpu")
    with on_triton(device):
        got = train(device)
    assert want.keys() == got.keys()
    tensors = [k for k in want if isinstance(want[k], torch.Tensor)]
    assert len(tensors) >= 10
    for k in want:
        if k in tensors:
            assert_same(got[k], want[k], f"parameter {k}")
        else:
            assert got[k] == want[k], k
