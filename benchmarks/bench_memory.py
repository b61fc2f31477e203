"""Peak memory (max resident set size) of a short training run per policy, each in a
fresh process, against float32 torch in the same invocation.

    python benchmarks/bench_memory.py --data-dir ../shared/data --subset 4000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile


_CHILD = """
import resource, sys
from positnn.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code or 0)
"""


def peak_mib(args: list[str]) -> float:
    """Run ``positnn train ARGS`` in a fresh process; its own peak RSS in MiB."""
    done = subprocess.run([sys.executable, "-c", _CHILD, "train", *args], check=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    return int(done.stderr.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--policies", nargs="+", default=["float32", "posit8-O16-L16q", "posit(16,2)q"])
    args = ap.parse_args()
    rows = []
    for policy in args.policies:
        with tempfile.TemporaryDirectory() as out:
            cmd = ["--model", args.model, "--policy", policy, "--epochs", "1", "--subset", str(args.subset),
                   "--threads", "1", "--no-progress", "--out", out]
            rows.append((policy, peak_mib(cmd + (["--data-dir", args.data_dir] if args.data_dir else []))))
    ref = dict(rows).get("float32")
    print(f"{args.model}, one epoch on {args.subset} images, batch 64, each policy in a fresh process")
    for policy, mib in rows:
        print(f"{policy:18} peak RSS {mib:7.0f} MiB" + (f"  x float32 {mib / ref:4.2f}" if ref else ""))


if __name__ == "__main__":
    main()
