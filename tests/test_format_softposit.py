"""positnn.format against PyPI softposit 0.3.4.4 (posit8 = (8,0), posit16 = (16,1),
posit32 = (32,2), posit_2(x, n) = (n,2)).

softposit is driven through its low-level functions on raw bit patterns (``pX_add`` and
friends, ``.v`` fields), not through its Python wrapper classes, which print TypeErrors
instead of raising them and have a broken ``posit8.fma`` branch.  posit_2 keeps an n-bit
pattern left-aligned in 32 bits and does not check n, so n is kept in 3..32 here.

Where positnn and softposit disagree, the exact Fraction reference decides: a test fails
only if positnn is wrong; softposit deviations are reported as warnings.
"""
from __future__ import annotations

import itertools
import math
import random
import warnings
from fractions import Fraction

import pytest
import torch

sp = pytest.importorskip("softposit")

from positnn import Posit  # noqa: E402
from posit_reference import decode_pattern, nar_pattern, round_pattern  # noqa: E402
from test_format import (  # noqa: E402
    boundary,
    f64,
    mask,
    near_tie_cases,
    random_patterns,
    ref_float,
    ref_op_pattern,
    signed,
    structured_cases,
    top,
)


class SoftPosit:
    """Bit-pattern interface to one softposit type; patterns are unsigned n-bit ints."""

    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n
        self.es = {"posit8": 0, "posit16": 1}.get(kind, 2)
        if kind == "posit_2":
            self.shift = 32 - n
            self.new = sp.posit_2_t
            self.to_double = sp.convertPX2ToDouble
            self._from_double = lambda x: sp.convertDoubleToPX2(x, n)
            self._ops = {
                "add": lambda a, b: sp.pX2_add(a, b, n), "sub": lambda a, b: sp.pX2_sub(a, b, n),
                "mul": lambda a, b: sp.pX2_mul(a, b, n), "div": lambda a, b: sp.pX2_div(a, b, n),
                "sqrt": lambda a: sp.pX2_sqrt(a, n), "fma": lambda a, b, c: sp.pX2_mulAdd(a, b, c, n),
            }
        else:
            w = {"posit8": "8", "posit16": "16", "posit32": "32"}[kind]
            self.shift = 0
            self.new = getattr(sp, f"posit{w}_t")
            self.to_double = getattr(sp, f"convertP{w}ToDouble")
            self._from_double = getattr(sp, f"convertDoubleToP{w}")
            self._ops = {op: getattr(sp, f"p{w}_{name}") for op, name in
                         [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"),
                          ("sqrt", "sqrt"), ("fma", "mulAdd")]}   # mulAdd(a, b, c) = a*b + c

    @property
    def fmt(self) -> Posit:
        return Posit(self.n, self.es)

    def struct(self, p: int):
        s = self.new()
        s.v = (p & mask(self.n)) << self.shift
        return s

    def bits(self, s) -> int:
        return (s.v >> self.shift) & mask(self.n)

    def value(self, p: int) -> float:
        d = self.to_double(self.struct(p))
        return NAN if math.isinf(d) or math.isnan(d) else d    # NaR comes back as inf

    def from_double(self, x: float) -> int:
        return self.bits(self._from_double(x))

    def op(self, name: str, pats) -> int:
        return self.bits(self._ops[name](*[self.struct(p) for p in pats]))


NAN = float("nan")
KINDS = [("posit8", 8), ("posit16", 16), ("posit32", 32)] + [("posit_2", n) for n in range(3, 33)]
KIND_IDS = [k if k != "posit_2" else f"posit_2-{n}" for k, n in KINDS]
OPS = ["add", "sub", "mul", "div", "sqrt", "fma"]
ARITY = {"add": 2, "sub": 2, "mul": 2, "div": 2, "sqrt": 1, "fma": 3}


def compare_patterns(lib, soft, ref, what, describe):
    """lib and soft: lists of unsigned patterns; ref(i) -> reference pattern, called only
    where they differ. Fails where positnn differs from the reference."""
    lib_wrong, soft_wrong = [], []
    for i, (a, b) in enumerate(zip(lib, soft)):
        if a != b:
            r = ref(i)
            if a != r:
                lib_wrong.append(f"  {describe(i)}: positnn {a:#x}, softposit {b:#x}, reference {r:#x}")
            if b != r:
                soft_wrong.append(f"  {describe(i)}: softposit {b:#x}, reference {r:#x}")
    if soft_wrong:
        warnings.warn(f"softposit differs from the reference in {what}:\n" + "\n".join(soft_wrong[:10]))
    if lib_wrong:
        pytest.fail(f"{what}: {len(lib_wrong)} of {len(lib)} wrong:\n" + "\n".join(lib_wrong[:10]))


def lib_patterns(fmt: Posit, values: torch.Tensor):
    return [p & mask(fmt.nbits) for p in fmt.encode(values).long().tolist()]


# --------------------------------------------------------------------- decode / encode


@pytest.mark.parametrize("kind,n", KINDS, ids=KIND_IDS)
def test_decode_encode_vs_softposit(kind, n):
    S = SoftPosit(kind, n)
    f = S.fmt
    if n <= 16:
        pats = list(range(1 << n))
    else:
        pats = [0, 1, top(n), nar_pattern(n), mask(n)] + random_patterns(n, 5000, random.Random(n))
    soft = f64([S.value(p) for p in pats])
    bits = torch.tensor([signed(p, n) for p in pats], dtype=f.storage_dtype)
    got = f.decode(bits).double()
    bad = ~((got == soft) | (got.isnan() & soft.isnan()))
    for i in bad.nonzero().flatten().tolist()[:10]:
        ref = decode_pattern(pats[i], n, S.es)
        pytest.fail(f"{f} decode({pats[i]:#x}) = {got[i].item()!r}, softposit {soft[i].item()!r}, "
                    f"reference {None if ref is None else float(ref)!r}")
    assert torch.equal(f.encode(soft.to(f.dtype)), bits)


# ----------------------------------------------------------------------------- rounding


def double_inputs(n, es, count, rng):
    span = (n - 2) * 2**es + 10
    xs = [rng.choice((-1, 1)) * (1 + rng.random()) * 2.0 ** rng.uniform(-span, span) for _ in range(count)]
    for r in rng.sample(range(-top(n), top(n)), min(count // 4, 2 * top(n))):
        m = float(boundary(r, n, es))                        # (n+1)-bit midpoints
        xs += [m, math.nextafter(m, -math.inf), math.nextafter(m, math.inf)]
    return xs + [0.0, 1e-300, -1e300, math.inf, -math.inf, NAN, 5e-324]


def check_round(S: SoftPosit, count, seed):
    f, n, es = S.fmt, S.n, S.es
    xs = double_inputs(n, es, count, random.Random(seed))
    lib = lib_patterns(f, f.round(f64(xs)))
    soft = [S.from_double(x) for x in xs]

    def ref(i):
        x = xs[i]
        return nar_pattern(n) if not math.isfinite(x) else round_pattern(Fraction(x), n, es)

    compare_patterns(lib, soft, ref, f"{f} round(float64)", lambda i: f"round({xs[i]!r})")


@pytest.mark.parametrize("kind,n", KINDS, ids=KIND_IDS)
def test_round_vs_softposit(kind, n):
    check_round(SoftPosit(kind, n), 1000, seed=n)


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", KINDS, ids=KIND_IDS)
def test_round_vs_softposit_slow(kind, n):
    check_round(SoftPosit(kind, n), 100_000, seed=n + 99)


# --------------------------------------------------------------------------- arithmetic


def operand_patterns(n, count, k, rng, exhaustive_ok):
    if exhaustive_ok and (1 << n) ** k <= count:
        return [list(c) for c in itertools.product(range(1 << n), repeat=k)]
    pats = random_patterns(n, count * k, rng)
    cases = [pats[i * k:(i + 1) * k] for i in range(count)]
    specials = [0, 1, top(n), nar_pattern(n), mask(n), (-top(n)) & mask(n), 1 << (n - 2)]
    return cases + [[s] * k for s in specials]


def check_op(S: SoftPosit, op, count, seed, exhaustive_ok=False):
    f, n, es = S.fmt, S.n, S.es
    k = ARITY[op]
    rng = random.Random(seed)
    cases = operand_patterns(n, count, k, rng, exhaustive_ok)
    # midpoint +- tiny operands (double-rounding traps) that random tuples almost never hit
    cases += structured_cases(op, n, es) + near_tie_cases(op, n, es, min(count // 20, 5000), rng)
    args = [f64([ref_float(c[i], n, es) for c in cases]).to(f.dtype) for i in range(k)]
    lib = lib_patterns(f, getattr(f, op)(*args))
    soft = [S.op(op, c) for c in cases]
    compare_patterns(lib, soft, lambda i: ref_op_pattern(op, n, es, cases[i]), f"{f} {op}",
                     lambda i: f"{op}({', '.join(repr(ref_float(p, n, es)) for p in cases[i])})")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind,n", KINDS, ids=KIND_IDS)
def test_ops_vs_softposit(kind, n, op):
    check_op(SoftPosit(kind, n), op, 600, seed=n * 10 + OPS.index(op))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind,n", KINDS, ids=KIND_IDS)
def test_ops_vs_softposit_slow(kind, n, op):
    """>= 100,000 random operand tuples per format (exhaustive where that is smaller)."""
    check_op(SoftPosit(kind, n), op, 100_000, seed=7 + n * 10 + OPS.index(op), exhaustive_ok=True)


def test_softposit_adapter_sanity():
    """The adapter reads softposit correctly (otherwise every comparison is moot)."""
    S = SoftPosit("posit16", 16)
    assert S.value(0x4000) == 1.0 and math.isnan(S.value(0x8000)) and S.value(0x7FFF) == 2.0**28
    assert S.op("fma", [S.from_double(1.5), S.from_double(2.0), S.from_double(0.25)]) == S.from_double(3.25)
    T = SoftPosit("posit_2", 8)
    assert T.value(0x40) == 1.0 and T.value(0x7F) == 2.0**24 and T.value(0x01) == 2.0**-24
    assert T.from_double(20.0) == round_pattern(20, 8, 2)
    assert SoftPosit("posit8", 8).from_double(20.0) == 0x7C == round_pattern(16, 8, 0)  # 0 11111 0 0
    assert SoftPosit("posit8", 8).value(SoftPosit("posit8", 8).from_double(20.0)) == 16.0
